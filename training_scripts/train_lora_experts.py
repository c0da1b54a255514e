"""Fine-tune SmolLM2-135M-Instruct (or any local causal LM) with MixLoRA or SMoRA on a multi-task instruction mix,
and compare its held-out loss with plain LoRA at the same trainable-parameter budget.

    python training_scripts/train_lora_experts.py --output_dir runs/mixlora --method mixlora \
        --num_experts 8 --top_k 2 --r 8 --num_train_epochs 1 --per_device_train_batch_size 4 --learning_rate 2e-4

The data (MMLU and BIG-Bench-Hard chain-of-thought prompts, GSM8K samples) ships inside the lm_eval wheel:
``pip install --no-deps lm_eval==0.4.13``. Every Trainer option works (``--gradient_accumulation_steps``,
``--bf16``, ``--save_steps``, ``--resume_from_checkpoint true`` ...). Each run's adapter lands in
``output_dir/<method>`` and loads with ``AutoPeftModelForCausalLM.from_pretrained`` after ``import moe_zoo``;
``output_dir/results.json`` holds the comparison.
"""

from transformers import HfArgumentParser, TrainingArguments

from moe_zoo.training.lora_experts import LoraExpertsArguments, run

if __name__ == "__main__":
    experts_args, training_args = HfArgumentParser(
        (LoraExpertsArguments, TrainingArguments)
    ).parse_args_into_dataclasses()
    run(experts_args, training_args)
