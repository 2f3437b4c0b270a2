"""moefy/checks.py helpers beyond those RoutingConfig is built from (those are tested in test_config.py)."""
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from moefy.checks import check_path, check_tensor


def test_check_tensor():
    t = torch.zeros(2, 3)
    assert check_tensor(t, "x") is t
    assert check_tensor(torch.zeros(2, dtype=torch.long), "x") is not None  # any dtype without floating
    assert check_tensor(torch.zeros((), dtype=torch.float64), "x", floating=True).dim() == 0
    for bad, shown in (([1.0], "list"), (np.zeros(2), "ndarray"), (None, "NoneType"), (1.0, "float")):
        with pytest.raises(TypeError, match=rf"^x must be a torch.Tensor, got {shown}$"):
            check_tensor(bad, "x")
        with pytest.raises(TypeError, match=rf"^x must be a floating-point torch.Tensor, got {shown}$"):
            check_tensor(bad, "x", floating=True)
    for dtype in (torch.long, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=rf"^x must be a floating-point torch.Tensor, got dtype {dtype}$"):
            check_tensor(torch.zeros(2, dtype=dtype), "x", floating=True)


def test_check_path(tmp_path):
    assert check_path("a/b.jsonl", "path") == Path("a/b.jsonl")
    assert isinstance(check_path("a", "path"), Path)
    assert check_path(tmp_path, "directory") == tmp_path
    assert check_path(PurePosixPath("x/y"), "path") == Path("x/y")  # any os.PathLike
    for bad, shown in ((3, "int"), (None, "NoneType"), (b"a", "bytes"), (["a"], "list")):
        with pytest.raises(TypeError, match=rf"^data_dir must be a path \(str or os.PathLike\), got {shown}$"):
            check_path(bad, "data_dir")
