"""Data preparation for SFT and RL: streaming readers (readers), row checks and filters (filters), SFT converters
(sft), SFT sampling and splits (mix) and RL converters (rl). Imports no model code: token counts come in as a
`count_tokens(text) -> int` callable."""
