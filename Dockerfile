# GPU image for H100 clusters (Slurm + pyxis/enroot, or Kubernetes).
#
# Base: NVIDIA NeMo Framework container 25.09. Why this tag: it is a NeMo 2.x container that still ships
# `nemo.collections.llm` (NeMo 3.0 on PyPI is speech-only and the LLM stack moved to Megatron-Bridge), and it carries
# what cannot be pip-installed on a CPU machine: a CUDA build of torch, Transformer Engine with FP8 kernels for Hopper
# (sm_90), flash attention, NCCL and Apex. Later framework containers are built around Megatron-Bridge.
FROM nvcr.io/nvidia/nemo:25.09

WORKDIR /opt/ellama-recipes
COPY . .

# 1. Pin the engine APIs this package is written against (ENGINE_FACTS.md: nemo 2.7.3 + megatron-core 0.15.3),
#    without letting pip touch the container's CUDA torch / Transformer Engine.
# 2. Freeze everything the container has, then install ellama-recipes with its `gpu` extra under that freeze:
#    pip adds only what is missing (datasketch, typer, ...) and keeps torch, TE and friends as NVIDIA built them.
RUN pip install --no-cache-dir --no-deps "nemo_toolkit==2.7.3" "megatron-core==0.15.3" \
 && pip list --format=freeze | grep -v -i -E "^(ellama-recipes|ellama_recipes)==" > /tmp/container-pins.txt \
 && pip install --no-cache-dir -c /tmp/container-pins.txt ".[gpu]" \
 && ellama --help >/dev/null

ENV TORCH_NCCL_AVOID_RECORD_STREAMS=1 \
    NVTE_FLASH_ATTN=1 \
    NVTE_FUSED_ATTN=1
ENTRYPOINT ["ellama"]
CMD ["--help"]
