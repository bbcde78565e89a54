"""GLM-4V family: GLM-4.1V / 4.5V from transformers (`family.GLM4V`, `processor.Glm4vProcessor`)."""
