# Source this at the start of a command on the lent H200 machine (repository root as working directory):
#   . benchmarks/device_env.sh
# It installs the wheels carried in .whl/ (deepspeed, pydantic, hjson, liger-kernel: the GPU image lacks them,
# see ../shared/docs/GPU.md) and lemo_ds itself into /tmp/site, and puts them on the paths.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site . \
  >/dev/null || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
