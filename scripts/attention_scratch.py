"""Self-attention at the 16x16 latent, trained from the start: is it a better design at matched steps?

``scripts/attention_finetune.py`` added the attention layers to the shipped UNet and found no
lift in 3,000 steps. The shipped UNet learned its layout without them, so that test cannot say
what a UNet that had them from step 0 would learn. This script trains exactly the shipped
pretraining run (``params.pretrain``: pool, seed, schedule, draws) with one change,
``full_res_attention: true``, on the shipped VAE's latents (its encoder is the one pretraining
encoded the pool with), and reads its EMA snapshots with the inspector on this study's own
prompts and image seeds (7,500,000+, as ``attention_finetune``), never the audit's. The
committed ``pretrain.curve`` gives the shipped design at the same steps, with two differences
the comparison has to carry: 48 prompts a group on the audit's seeds (a different draw of the
same population), and decoded by the VAE before its sharpening pass, which at the last step
lifted the shipped model from 0.80 / 0.57 to 0.91 / 0.65 (README). Its snapshots were not kept,
so they cannot be read again through the shipped decoder.

It stops at ``--until`` checkpointed; run it again with a larger ``--until`` to go on (the
resumable state is in ``--work``; ``--export-state`` writes it in git-sized parts, which
``--import-state`` on another machine goes on from). Nothing here changes what the factory ships.

    python scripts/attention_scratch.py --until 9000 --work /work/scratch/attn-scratch \\
        --out metrics/attention_scratch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from attention_finetune import EVAL_SEED, fidelity, train_arm

from datasetdm.backbones.pretrain_sd import (
    UNET_STATE,
    build_components,
    encode_pool,
    export_state,
    import_state,
    render_pool,
    snapshot_components,
    snapshots,
)
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.sd_folder import load_components, resolve_folder
from datasetdm.config import Params, load_params
from datasetdm.evaluate.inspector import Inspector
from datasetdm.io import write_json

logger = logging.getLogger("attention_scratch")


def scratch_params(params: Params, work: Path) -> Params:
    """The shipped pretraining settings with attention at the latent resolution, checkpoints in ``work``."""
    pretrain = dataclasses.replace(params.pretrain, full_res_attention=True, out=str(work / "model"))
    return dataclasses.replace(params, pretrain=pretrain)


def train(params: Params, shipped_vae: torch.nn.Module, work: Path, until: int) -> list[dict]:
    """Pretraining's UNet stage on the shipped VAE's latents, to step ``until``; returns the loss log."""
    # 1. the pool pretraining drew (same seed), encoded by the encoder it was encoded with
    images, captions = render_pool(params, params.pretrain.pool_size, params.pretrain.seed)
    means, stds = encode_pool(shipped_vae, images, torch.device("cpu"))
    # 2. fresh UNet and text encoder of the new design (seeded as pretraining seeds them)
    components = build_components(params)
    components["vae"] = shipped_vae
    # 3. train (resumes from the state in ``work``)
    return train_arm(params, components, (means, stds, captions), work, until_step=until)


def _rows_read_before(out: Path, num: int) -> dict[int, dict]:
    """Snapshot readings an earlier run of this script wrote to ``out`` with the same range and size, by step."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    if earlier.get("eval_seed") != EVAL_SEED or earlier.get("num_per_group") != num:
        return {}
    return {row["step"]: row for row in earlier.get("rows", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--until", type=int, required=True, help="train to this step (checkpointed there)")
    parser.add_argument("--num", type=int, default=300, help="prompts per group at each snapshot read")
    parser.add_argument("--read-every", type=int, default=2000, help="read every this many steps, and the last")
    parser.add_argument("--read-only", action="store_true", help="read the snapshots there are; train nothing")
    parser.add_argument("--import-state", default=None, help="go on from the checkpoint parts in this folder")
    parser.add_argument("--export-state", default=None, help="after training, write the checkpoint here in parts")
    parser.add_argument("--work", default="/work/scratch/attn-scratch")
    parser.add_argument("--out", default="metrics/attention_scratch.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)

    base = load_params(args.params)
    work = Path(args.work)
    params = scratch_params(base, work)
    shipped = load_components(resolve_folder(base.backbone.model), torch.float32)
    state = work / "model.work" / UNET_STATE
    if args.import_state and not state.is_dir():
        logger.info("going on from step %d (%s)", import_state(Path(args.import_state), state), args.import_state)
    if not args.read_only:
        start = time.perf_counter()
        train(params, shipped["vae"], work, args.until)
        logger.info("training took %.1f min", (time.perf_counter() - start) / 60)
    if args.export_state:
        export_state(state, Path(args.export_state))
    # 4. read the snapshots on this study's range; the shipped design's curve beside them
    inspector = Inspector.load(base.inspect.model)
    shipped_curve = {row["step"]: row for row in json.loads(Path(base.pretrain.curve).read_text())}
    found = snapshots(params)
    last = found[-1][0] if found else 0
    # A snapshot never changes once written, so an earlier reading stands, even where its snapshot stayed on
    # another machine (a run carried on with --import-state).
    rows = _rows_read_before(Path(args.out), args.num)
    for step, snap in found:
        if (step % args.read_every and step != last) or step in rows:
            continue
        meta = json.loads((snap / "meta.json").read_text())
        row = fidelity(StableDiffusionBackbone(snapshot_components(params, snap)), inspector, params, args.num)
        shipped_row = shipped_curve.get(step, {})
        rows[step] = {
            "step": step,
            "minutes": round(meta["minutes"], 1),
            "loss": meta["loss"],
            **row,
            "shipped_design": {k: shipped_row.get(k) for k in ("loss", "single_object", "two_objects")},
        }
        logger.info("step %d: %s (shipped design at this step: %s)", step, row, rows[step]["shipped_design"])
    result = {
        "eval_seed": EVAL_SEED,
        "num_per_group": args.num,
        "change": "pretrain.full_res_attention: true (all else as params.pretrain)",
        "shipped_design_curve": base.pretrain.curve,
        "shipped_design_curve_caveat": "48 prompts a group, audit seeds, VAE decoder before its sharpening pass",
        "reached": max([last, *rows]),
        "of_steps": params.pretrain.steps,
        "rows": [rows[step] for step in sorted(rows)],
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
