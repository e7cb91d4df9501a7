"""ONNX graphs, no ONNX Runtime: model I/O, conv sites, the GDWS node pattern, the pass convention,
the GDWS rewrite, the Gather fold, and removal of values nothing reads (cleanup)."""
