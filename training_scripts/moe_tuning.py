"""MoE-LLaVA's three-stage MoE-tuning with the Trainer: one stage, or all three in sequence.

    # all three stages into runs/moe-llava/stage{1,2,3}
    python training_scripts/moe_tuning.py --all_stages --vision_tower clip-vision --language_model smollm2 \
        --data_file train.jsonl --output_dir runs/moe-llava --num_train_epochs 1 --per_device_train_batch_size 8

    # one stage at a time
    python training_scripts/moe_tuning.py --stage 1 --vision_tower clip-vision --data_file train.jsonl --output_dir runs/s1
    python training_scripts/moe_tuning.py --stage 2 --init_model runs/s1 --data_file train.jsonl --output_dir runs/s2
    python training_scripts/moe_tuning.py --stage 3 --init_model runs/s2 --data_file train.jsonl --output_dir runs/s3

    # QLoRA: stage 3 on a 4-bit base (LoRA on the quantized weights, routers in fp32), saved merged in fp32
    python training_scripts/moe_tuning.py --stage 3 --init_model runs/s2 --data_file train.jsonl --output_dir runs/s3 \
        --load_in_4bit true --qlora_rank 8 --learning_rate 2e-4

``--data_file`` is a JSONL of ``{"image": path, "question": str, "answer": str}`` (or ``"messages"`` in chat format);
relative image paths are resolved against ``--image_root`` (default: the file's folder). ``--stage{1,2,3}_data_file``
give a stage its own data in ``--all_stages`` runs. Every Trainer option works; ``--learning_rate`` left unset
means the original's 1e-3 (stage 1) and 2e-5 (stages 2 and 3). ``--resume_from_checkpoint true`` continues a
stopped run (with ``--all_stages``: finished stages are skipped). Without ``--language_model`` the shipped
SmolLM2-135M-Instruct is used. With ``--eval_data_file``, each stage ends by printing its exact-match accuracy.
Each stage's output loads with ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` after
``import moe_zoo``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, TrainingArguments

from moe_zoo.training.moe_tuning import (
    MoeTuningArguments,
    answer_questions,
    load_image_qa_jsonl,
    run_all_stages,
    run_stage,
)


@dataclass
class DataArguments:
    data_file: str
    eval_data_file: str | None = None
    image_root: str | None = None
    all_stages: bool = False
    stage1_data_file: str | None = None
    stage2_data_file: str | None = None
    stage3_data_file: str | None = None


def exact_match(output_dir: str, examples: list[dict], conversation: str) -> float:
    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    answers = answer_questions(model, processor, examples, max_new_tokens=16, conversation=conversation)
    expected = [e.get("answer", "") for e in examples]
    return sum(a.strip().lower() == b.strip().lower() for a, b in zip(answers, expected, strict=True)) / len(examples)


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((MoeTuningArguments, DataArguments, TrainingArguments))
    tuning, data, training = parser.parse_args_into_dataclasses(args=argv)
    train = load_image_qa_jsonl(data.data_file, data.image_root)
    evaluation = load_image_qa_jsonl(data.eval_data_file, data.image_root) if data.eval_data_file else None
    if data.all_stages:
        files = {1: data.stage1_data_file, 2: data.stage2_data_file, 3: data.stage3_data_file}
        stage_data = {s: load_image_qa_jsonl(f, data.image_root) for s, f in files.items() if f}
        trainers = run_all_stages(tuning, training, train, stage_datasets=stage_data)
        outputs = [(s, f"{training.output_dir}/stage{s}") for s in (1, 2, 3)]
    else:
        trainers = [run_stage(tuning, training, train, eval_dataset=evaluation)]
        outputs = [(tuning.stage, training.output_dir)]
    if evaluation and training.process_index == 0:  # under torchrun, the main process evaluates the saved stages
        for stage, folder in outputs:
            conversation = tuning.conversation or ("plain" if stage == 1 else "chat")
            print(f"stage {stage}: exact match {exact_match(folder, evaluation, conversation):.3f} ({folder})")
    return trainers


if __name__ == "__main__":
    main()
