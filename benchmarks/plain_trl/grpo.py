"""A plain TRL GRPO script, written the way TRL's examples/scripts/grpo.py is, scored by the tiny world's rule.

python benchmarks/plain_trl/grpo.py --config cfg.yaml --dataset_name prompts.jsonl
"""

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from rlhf.data.synthetic import rule_reward

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    dataset = load_dataset("json", data_files=script_args.dataset_name, split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[rule_reward],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
