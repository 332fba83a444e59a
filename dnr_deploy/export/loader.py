"""Loading a deploy dir back into PyTorch, with nothing unpickled and every file checked."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dnr_deploy.compress.byo import wrap_module
from dnr_deploy.deploydir import manifest, names, signing
from dnr_deploy.export import channel, csr
from dnr_deploy.files import artifact_file
from dnr_deploy.models import ModelSpecError, create_model
from dnr_deploy.sparsity import surgery
from dnr_deploy.trust import UntrustedModelCode, check_spec_trusted


def load_deployed_model(deploy_dir: str | Path, verify: bool = True,
                        model: nn.Module | str | None = None,
                        verify_key: str | Path | None = None,
                        trust_model_code: bool = False) -> nn.Module:
    """A PyTorch model (eval mode) rebuilt from a deploy dir, with nothing unpickled.

    Irregular runs load from the CSR bundle; channel and dense runs replay the pruning history
    on a freshly built architecture (`model`, a fresh instance of the run's module, when given:
    the one way for a run trained on a module passed to `dnr_deploy.compress`), then load the
    state dict. A manifest's MODULE:FACTORY spec is imported only when `model` names the same
    spec (a string) or `trust_model_code` is set: a deploy dir chooses no code to run.

    `verify_key`: a public key (PEM); the deploy dir must carry a valid signature from its
    private key over every file (`dnr_deploy.deploydir.signing`). Without it, one
    `SignatureNotice` says the dir is unsigned or its signature was not checked.

    Raises:
        ManifestError: not a deploy dir, a file that fails its sha256 (when `verify`), a
            MODULE:FACTORY spec not named or trusted, or weights that do not fit the recorded
            architecture.
        SignatureError (a ManifestError): with `verify_key`, no valid signature.
    """
    deploy_dir = Path(deploy_dir)
    if verify_key is not None:
        signing.check_signature(deploy_dir, verify_key)
    info = manifest.load_manifest(deploy_dir)
    files = info["files"]
    needed = [names.CSR_FILE] if names.CSR_FILE in files else [names.WEIGHTS_FILE,
                                                               names.HISTORY_FILE]
    if verify:
        manifest.verify_files(deploy_dir, info, needed)
    if verify_key is None:
        signing.check_signature(deploy_dir, None)
    for name in needed:  # unverified or not, read only regular files inside the deploy dir
        artifact_file(deploy_dir, name, manifest.ManifestError)
    spec = info["model"]
    chans = spec["in_chans"]
    if len(info.get("mean") or []) != chans or len(info.get("std") or []) != chans:
        raise manifest.ManifestError(f"the manifest's mean and std must hold {chans} values "
                                     f"(one per input channel); re-export the run")
    try:  # a spec string only: a user's MODULE:FACTORY is imported, never unpickled
        if isinstance(model, nn.Module):
            model = wrap_module(model, info)
        else:
            check_spec_trusted(spec["name"], f"the manifest of {str(deploy_dir)!r}", model,
                               trust_model_code)
            model = create_model(spec["name"], spec["num_classes"], chans, info["mean"],
                                 info["std"])
    except UntrustedModelCode as err:
        raise manifest.ManifestError(str(err)) from None
    except ModelSpecError as err:
        raise manifest.ManifestError(f"the manifest's model: {err}") from None
    try:
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if names.CSR_FILE in files:
            _, state = csr.read_csr_bundle(deploy_dir / names.CSR_FILE, shapes)
        else:  # a shrunk model is smaller than the full one: the same bound holds
            state, history = channel.load_state(deploy_dir, csr.weights_bytes_limit(shapes))
            if history:
                surgery.replay_pruning(model, history, torch.zeros(1, *info["input_shape"]))
        model.load_state_dict(state)
    except (csr.CsrError, surgery.ShrinkError) as err:
        raise manifest.ManifestError(str(err)) from None
    except (AttributeError, IndexError, KeyError, RuntimeError, ValueError) as err:
        raise manifest.ManifestError(
            f"the weights in {str(deploy_dir)!r} do not fit a {spec['name']!r}: "
            f"{' '.join(str(err).split())[:300] or type(err).__name__}"
        ) from None
    return model.eval()
