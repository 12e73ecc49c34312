"""llava_nb: build, train and use a LLaVA-style vision-language model on a free Colab T4."""

__version__ = "0.1.0"
