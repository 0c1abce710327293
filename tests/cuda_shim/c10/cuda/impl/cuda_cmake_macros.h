#pragma once
// The torch CPU wheel ships c10/cuda headers but not this generated one; the nvcc
// compile check (tests/test_cuda_sources.py) puts this folder on the include path only
// when torch lacks it. A CUDA build of torch has the real file.
#define C10_CUDA_BUILD_SHARED_LIBS
