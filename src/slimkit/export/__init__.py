"""ONNX export and the ONNX Runtime parity check."""

from slimkit.export.onnx import check_parity, export_onnx

__all__ = ["check_parity", "export_onnx"]
