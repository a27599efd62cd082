"""Weight-only int8 / int4 quantization for the engine: a re-export of lmstack.models.quant.

The quantized layers live with the models (layer 1) because LoRA fine-tuning over a quantized base
(lmstack.models.peft, ``lmstack sft --lora --quantize``) uses them too; the engine and the CLI keep
importing them from here.

    from lmstack.engine.quant import quantize_model
    model = quantize_model(model, "int8")            # or "int4"; in place, returns model
"""

from lmstack.models.quant import MODES, Int4Linear, Int8Linear, dequantize_model, quantize_model, weight_bytes

__all__ = ["MODES", "Int4Linear", "Int8Linear", "dequantize_model", "quantize_model", "weight_bytes"]
