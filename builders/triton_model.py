"""The ``model.py`` of every genrec model served by Triton's Python backend (copied there by the builder).

A thin adapter: tensors in, ``genrec.builders.handlers`` out, one response per request. Which handler runs
is the config's ``handler`` parameter. Bad input comes back as an error response for that request only; an
unexpected failure fails the batch's requests with INTERNAL naming the model (the traceback goes to the
server log) and leaves the model loaded. A request whose caller has gone (cancelled, deadline passed before
its step started) is answered CANCELLED without being computed.
"""

import json
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from genrec.builders.handlers import load_handler


def _error(message: str, invalid_argument: bool) -> "pb_utils.TritonError":
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.name = f"{args['model_name']} version {args['model_version']}"
        self.handler = load_handler(parameters["handler"], version_dir, parameters)

    def execute(self, requests: list) -> list:
        cancelled = [r.is_cancelled() for r in requests]
        live = [r for r, gone in zip(requests, cancelled, strict=True) if not gone]
        batch = []
        for request in live:
            tensors = (pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names)
            batch.append({t.name(): t.as_numpy() for t in tensors if t is not None})
        try:
            results = iter(self.handler.execute(batch) if batch else [])
        except Exception:  # a bug, not bad input: report it to every caller, keep serving
            pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
            error = _error(f"internal error in {self.name} (the server log has the details)", False)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        for gone in cancelled:
            if gone:
                error = pb_utils.TritonError("the caller cancelled the request", pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            result = next(results)
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(str(result), True)))
            else:
                outputs = [pb_utils.Tensor(name, array) for name, array in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
