"""A plain TRL reward-model script, written the way TRL's examples/scripts/reward_modeling.py is.

python benchmarks/plain_trl/reward.py --config cfg.yaml --dataset_name data.jsonl
"""

from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import ModelConfig, RewardConfig, RewardTrainer, ScriptArguments, TrlParser, get_peft_config

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, RewardConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    dataset = load_dataset("json", data_files=script_args.dataset_name, split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=1, dtype=model_args.dtype
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
