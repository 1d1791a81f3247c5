"""`l4q-eval`: perplexity, zero-shot multiple choice and MMLU on a checkpoint or an exported artifact."""
