"""Uni-MoE's progressive training with the Trainer: one run of one stage, or all three stages in sequence.

    # everything: stage 1 (image, then speech connector), stage 2 (image and speech experts), stage 3 (MoE)
    python training_scripts/train_uni_moe.py --stage all --language_model smollm2 --vision_tower clip-vision \
        --speech_model whisper-small --data_file train.jsonl --output_dir runs/uni-moe --num_train_epochs 1

    # one run at a time
    python training_scripts/train_uni_moe.py --stage 1 --modality image --language_model smollm2 \
        --vision_tower clip-vision --speech_model whisper-small --data_file captions.jsonl --output_dir runs/s1-image
    python training_scripts/train_uni_moe.py --stage 1 --modality speech --init_model runs/s1-image \
        --data_file transcripts.jsonl --output_dir runs/s1-speech
    python training_scripts/train_uni_moe.py --stage 2 --modality image --init_model runs/s1-speech \
        --data_file image_qa.jsonl --output_dir runs/s2-image
    python training_scripts/train_uni_moe.py --stage 3 --init_model runs/s1-speech \
        --experts base,runs/s2-image,runs/s2-speech --data_file mixed.jsonl --output_dir runs/s3

``--data_file`` is a JSONL of ``{"messages": [...], "images": [...], "videos": [...], "audios": [...]}`` with image
files, video frame folders and ``.wav`` files, relative to ``--media_root`` (default: the file's folder); see
:mod:`moe_zoo.training.uni_moe_data`. Stages 1 and 2 train on the examples whose only medium is their modality;
``--stage{1,2,3}_data_file`` give a stage its own data in ``--stage all`` runs. Every Trainer option works; options
left at the Trainer's defaults take the stage's (stage 3: lr 4e-5, cosine, warmup 0.03). ``--resume_from_checkpoint
true`` continues a stopped run (with ``--stage all``: finished runs are skipped). Each run's output loads with
``AutoModelForMultimodalLM`` / ``AutoProcessor.from_pretrained`` after ``import moe_zoo``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import HfArgumentParser, TrainingArguments

from moe_zoo.training.uni_moe_data import filter_modality, load_uni_moe_jsonl
from moe_zoo.training.uni_moe_stages import (
    StageRun,
    UniMoeTrainingArguments,
    run_all_stages,
    run_stage1,
    run_stage2,
    run_stage3,
)


@dataclass
class DataArguments:
    data_file: str
    eval_data_file: str | None = None
    media_root: str | None = None
    stage1_data_file: str | None = None
    stage2_data_file: str | None = None
    stage3_data_file: str | None = None


def main(argv: list[str] | None = None) -> list[StageRun | None]:
    parser = HfArgumentParser((UniMoeTrainingArguments, DataArguments, TrainingArguments))
    args, data, training = parser.parse_args_into_dataclasses(args=argv)
    train = load_uni_moe_jsonl(data.data_file, data.media_root)
    evaluation = load_uni_moe_jsonl(data.eval_data_file, data.media_root) if data.eval_data_file else None
    if args.stage == "all":
        files = {"stage1": data.stage1_data_file, "stage2": data.stage2_data_file, "stage3": data.stage3_data_file}
        stage_data = {key: load_uni_moe_jsonl(f, data.media_root) for key, f in files.items() if f}
        return run_all_stages(args, training, train, stage_datasets=stage_data)
    stage = int(args.stage)
    if stage in (1, 2):
        if args.modality is None:
            parser.error(f"--stage {stage} needs --modality (image, video, speech or audio).")
        train = filter_modality(train, args.modality)
        if not train:
            parser.error(f"{data.data_file} holds no example whose only medium is {args.modality}.")
        evaluation = filter_modality(evaluation, args.modality) if evaluation else None
    runner = {1: run_stage1, 2: run_stage2, 3: run_stage3}[stage]
    return [runner(args, training, train, eval_dataset=evaluation or None)]


if __name__ == "__main__":
    main()
