"""Metis-HOME training: (optional) GRPO on the dense model, expansion into thinking / non-thinking branches, then
SFT on mixed thinking and non-thinking data with branch labels.

    python training_scripts/train_metis_home.py --output_dir runs/metis-home --max_steps 200 \
        --per_device_train_batch_size 8 --data_path mix.jsonl [--rl_steps 50] [--router_layer 15]

``--data_path`` is JSON lines with ``question``, ``response`` (``<think>...</think><answer>...</answer>``, an empty
think block for non-thinking samples) and ``branch`` (``thinking`` / ``non_thinking``); without it, the offline
GSM8K + MMLU (thinking) / BIG-Bench-Hard direct-answer (non-thinking) mix from the ``lm_eval`` wheel is used. Without
``--model_path`` the shipped SmolLM2-135M-Instruct is the dense model. Every Trainer option drives the SFT stage
(``--learning_rate``, ``--gradient_accumulation_steps``, ``--bf16``, ``--save_steps``,
``--resume_from_checkpoint true`` ...). The model is saved to ``output_dir/metis_home`` and loads with
``AutoModelForCausalLM.from_pretrained`` after ``import moe_zoo``; ``output_dir/results.json`` holds the router's
held-out accuracy and the thinking ratio per task type.
"""

from transformers import HfArgumentParser, TrainingArguments

from moe_zoo.training.metis_home import MetisHomeArguments, run

if __name__ == "__main__":
    metis_args, training_args = HfArgumentParser((MetisHomeArguments, TrainingArguments)).parse_args_into_dataclasses()
    results, _ = run(metis_args, training_args)
    if training_args.process_index != 0:  # under torchrun / accelerate launch every process holds the same results
        raise SystemExit(0)
    routing = results["heldout_routing"]
    print(f"held-out router accuracy {routing['router_accuracy']:.1%} (majority {routing['majority_baseline']:.1%})")
    for family, stats in routing["by_family"].items():
        print(f"  {family}: thinking ratio {stats['thinking_ratio']:.1%} over {stats['count']} queries")
