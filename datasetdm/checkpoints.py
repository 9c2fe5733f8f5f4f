"""Loading model weights: safetensors only, and every failure one line naming the file.

Pickle-based checkpoints (``torch.save``, ``.bin``, ``.ckpt``) run code when loaded, so
the factory never unpickles: a file that is not safetensors is refused, with a hint
when it looks like a pickle. A file that loads but does not fit the model that
``config.json`` builds names the first tensor that does not fit.

Every checkpoint the factory writes records its weights file's sha256 in its own JSON
config (written inside the same atomic folder write), and every loader checks it: a
safetensors file edited or swapped after training still loads cleanly, and only its
hash tells. Hashing costs one more read of the file: under 1 ms for the default
decoder's 0.9 MB (README "Guarantees").
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from datasetdm.errors import DatasetDMError
from datasetdm.io import sha256_file

# The config key that holds the sha256 of the checkpoint's weights file.
WEIGHTS_SHA256 = "weights_sha256"
# torch.save writes a zip archive (since torch 1.6) or a bare pickle (protocol 2+ starts with 0x80).
_PICKLE_HINTS = (b"PK\x03\x04", b"\x80")


def load_weights(file: str | Path, module: torch.nn.Module, config_name: str = "config.json") -> None:
    """Load the safetensors ``file`` into ``module`` (strict); raise ``DatasetDMError`` on any problem."""
    file = Path(file)
    if not file.is_file():
        raise DatasetDMError(file, None, "weights file missing")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        with file.open("rb") as f:
            head = f.read(4)
        hint = ""
        if head.startswith(_PICKLE_HINTS):
            hint = "; it looks like a pickle (torch.save) file, which is refused because loading a pickle runs code"
        raise DatasetDMError(file, None, f"not a readable safetensors file ({e}){hint}") from None
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            missing = sum(1 for k in expected if k not in state)
            raise DatasetDMError(
                file,
                key,
                f"missing, but {config_name} builds a model with it "
                f"(wrong architecture: {missing} of {len(expected)} tensors missing)",
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DatasetDMError(
                file,
                key,
                f"shape {tuple(state[key].shape)}, but {config_name} builds "
                f"{tuple(tensor.shape)} (wrong architecture)",
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise DatasetDMError(
            file,
            unexpected[0],
            f"not in the model {config_name} builds (wrong architecture: {len(unexpected)} unexpected tensors)",
        )
    module.load_state_dict(state, strict=True)


def verify_weights(file: str | Path, recorded: object, *, config_file: str | Path, remedy: str) -> None:
    """Stop unless ``file`` hashes to ``recorded``, the sha256 its config holds under ``WEIGHTS_SHA256``.

    Called after ``load_weights`` so a truncated or pickled file keeps its more precise
    message; the hash catches what parses and fits yet is not what training wrote.
    ``remedy`` says what to run (e.g. "run the train-decoder stage"). A config without
    the key was not written by a sealing save (or had it removed) and is refused too:
    an unverifiable checkpoint is never used silently.
    """
    file, config_file = Path(file), Path(config_file)
    if not isinstance(recorded, str):
        raise DatasetDMError(
            config_file,
            WEIGHTS_SHA256,
            f"missing, so {file.name} cannot be checked against what training wrote; {remedy}",
        )
    if sha256_file(file) != recorded:
        raise DatasetDMError(
            file,
            "sha256",
            f"does not match the {WEIGHTS_SHA256} {config_file.name} recorded at training "
            f"(the weights changed since); {remedy}",
        )
