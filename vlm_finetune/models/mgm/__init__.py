"""MGM (Mini-Gemini) family: dual vision towers (CLIP + ConvNeXt) with patch info mining over Gemma, Llama,
Mistral and Mixtral LLMs (`family.MGM`, `modeling.MgmForCausalLM`); released checkpoints load and export in
their own layout (`checkpoint`)."""
