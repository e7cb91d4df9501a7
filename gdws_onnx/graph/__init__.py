"""ONNX graphs, no ONNX Runtime: model I/O, conv sites, the GDWS rewrite and the Gather fold."""
