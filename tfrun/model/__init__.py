"""The trained model: ONNX export with a parity check (:mod:`tfrun.model.export`, run after
training by rank 0's bootstrap in a child process, or by ``tfrun export``) and an HTTP
endpoint for it (:mod:`tfrun.model.serve`, ``tfrun serve``)."""
