"""ONNX Runtime: sessions and feeds (session), execution providers (providers), interleaved timing and profiles (bench)."""
