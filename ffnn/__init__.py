"""ffnn: the tutorials' MNIST MLP trained end to end with this library's fused kernels.

Commands: ``python -m ffnn.train``, ``python -m ffnn.evaluate``, ``python -m ffnn.predict``
(also installed as ffnn-train, ffnn-evaluate, ffnn-predict).
"""
from ffnn.data import CLASSES, Data, load as load_data, read_idx
from ffnn.errors import FFNNError
from ffnn.model import MLP, TorchMLP, build as build_model, count_parameters

__all__ = ["MLP", "TorchMLP", "build_model", "count_parameters", "load_data", "read_idx", "Data", "CLASSES",
           "FFNNError"]
