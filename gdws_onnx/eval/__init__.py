"""Evaluation: gradient sources, white-box attacks, and clean/robust validation judged by ONNX Runtime."""
