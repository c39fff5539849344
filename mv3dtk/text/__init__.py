"""Text: the report labeler, the rewrite backends (rules, ollama, openai) and their prompts."""
