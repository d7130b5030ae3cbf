"""`fasttune doctor`: checks of Python, torch/CUDA, GPU, build tools, attention kernels, optional packages and
resources, each with a reason and a fix. Entry point: `fasttune.doctor.checks.main(argv)`."""
