"""Upcycle a dense causal LM into an MoE and fine-tune it with the Trainer.

    python training_scripts/finetune_upcycled.py --data_file chats.jsonl --output_dir runs/smollm2-moe \
        --num_experts 4 --num_experts_per_tok 2 --moe_layers sparse --max_steps 200 --learning_rate 2e-5

Every Trainer option works (``--per_device_train_batch_size``, ``--gradient_accumulation_steps``, ``--bf16``,
``--save_steps``, ``--resume_from_checkpoint true`` ...). Without ``--model_path`` the shipped SmolLM2-135M-Instruct
is used. The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)`` after ``import moe_zoo``.
"""

from transformers import HfArgumentParser, TrainingArguments

from moe_zoo.training.finetune import UpcycleFinetuneArguments, run

if __name__ == "__main__":
    moe_args, training_args = HfArgumentParser(
        (UpcycleFinetuneArguments, TrainingArguments)
    ).parse_args_into_dataclasses()
    run(moe_args, training_args)
