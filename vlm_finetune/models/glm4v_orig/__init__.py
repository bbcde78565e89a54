"""The original GLM-4V-9B (ChatGLM code + EVA2-CLIP), natively: `family.GLM4V_ORIG`, `modeling.Glm4vOrigForCausalLM`;
released folders load and export in their own layout (`checkpoint`, `tokenizer`)."""
