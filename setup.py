"""Build script for cometq.

The pure-Python package (``python/cometq``) and the Triton kernels (``kernels/``,
installed as ``cometq.kernels``) always install.  The CUDA extension ``cometq._C``
(``csrc/``) is built only when torch has CUDA, nvcc is found, csrc/ holds
kernels, and ``COMETQ_SKIP_CUDA`` is not set to 1.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_safe_host_compiler() -> None:
    """Build with a C++ compiler that links the shared C++ runtime: one that puts a static
    copy into ``_C`` turns every TORCH_CHECK into a SIGSEGV (see ``python/cometq/_toolchain.py``)."""
    spec = importlib.util.spec_from_file_location("_cometq_toolchain",
                                                  os.path.join(ROOT, "python", "cometq", "_toolchain.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    override = mod.choose_host_compiler()
    if override:
        print(f"cometq: {os.environ.get('CXX', 'c++')} links a static C++ runtime into shared libraries "
              f"(C++ exceptions from cometq._C would crash); building with {override}", file=sys.stderr)
        os.environ.update(override)


def _cuda_extension():
    if os.environ.get("COMETQ_SKIP_CUDA", "0") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch missing at build time: pure-Python install
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        return [], {}
    if sys.platform.startswith("linux"):
        _use_safe_host_compiler()
    archs = os.environ.get("COMETQ_CUDA_ARCHS", "80;86;89;90a").split(";")
    gencode = []
    for a in archs:
        a = a.strip()
        if a == "90":
            # plain sm_90 code has no wgmma (the w16 GEMM's wgmma kernel compiles to a trap there, and
            # the launcher cannot tell): Hopper builds are sm_90a
            print("cometq: COMETQ_CUDA_ARCHS lists 90; building 90a (wgmma needs the arch-specific target)",
                  file=sys.stderr)
            a = "90a"
        flag = f"-gencode=arch=compute_{a},code=sm_{a}"
        if a and flag not in gencode:
            gencode.append(flag)
    # No -std flag: torch's BuildExtension adds the C++ standard its headers need
    # (-std=c++17 for both compilers on the GPU image's torch 2.11, run 9's build log); the
    # kernels and the bindings compile under C++17 and C++20 (tests/test_cuda_compile.py).
    # The kernels never use fast-math: act_quant relies on IEEE division.
    ext = CUDAExtension(
        name="cometq._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-DNDEBUG"],
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "4"] + gencode,
        },
    )
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="cometq",
    version="0.2.0",
    description="W4Ax-KV4 LLM inference: INT4 weights, mixed INT4/INT8 activations, 4-bit KV cache",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["cometq", "cometq.kernels"],
    package_dir={"cometq": "python/cometq", "cometq.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton>=3.3"],
        "hf": ["transformers>=4.56", "accelerate", "gguf", "tokenizers"],
        "serve": ["fastapi", "uvicorn"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "expecttest", "openai", "httpx"],
    },
    entry_points={"console_scripts": ["cometq=cometq.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
