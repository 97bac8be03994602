"""pgenrm-lite export toolchain: checkpoints to GGUF, embedders to ONNX, bundles.

Run it from the checkout with `python -m export <command> ...` (needs the `export` extra).
It uses the runtime package; the runtime never imports it.
"""
