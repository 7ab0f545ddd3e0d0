"""The pipeline's stages, one module per DVC stage; run each as `python -m stages.<verb>`."""
