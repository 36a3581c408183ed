"""The model: its shape (`config`), the network box by box (`gpt`: start reading here), generation's
KV cache (`kvcache`), and what changes it in place: LoRA adapters (`lora`), int8 weights (`quantize`);
FLOPs for MFU (`flops`)."""
