"""Our GGUF models written in other runtimes' formats (`edge-slm export`),
so that the backends for those runtimes, and their tests, have models.

Each format's module needs its own extra (`export-onnx`, ...), installed on a
development machine, never on the board; nothing here is imported by the
runtime."""
