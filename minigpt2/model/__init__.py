"""The model: its shape (`config`), the network box by box (`gpt`: start reading here), generation's
KV cache (`kvcache`), what changes it in place: LoRA adapters (`lora`), int8 weights (`quantize`);
and what measures it: loss and bits per character on a text (`evaluate`), drift from where it
started (`snapshots`), FLOPs for MFU (`flops`)."""
