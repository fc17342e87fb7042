"""genrec-client: a thin gRPC client for the genrec recommendations served by NVIDIA Triton.

    from genrec.client import RecommendClient

    with RecommendClient("localhost:8001") as client:
        recs = client.recommend([50, 172, 133], k=10)
        for item in recs:
            print(item.item_id, item.score)

Needs numpy and tritonclient[grpc] only. Every failure raises `GenrecError`.
"""

from .client import RecommendClient
from .errors import GenrecError
from .types import Ranking, Recommendations, ScoredItem

__all__ = ["GenrecError", "Ranking", "RecommendClient", "Recommendations", "ScoredItem"]
