"""ngcal.export: model directory -> verified ONNX/TensorRT bundle (torch imported lazily)."""
