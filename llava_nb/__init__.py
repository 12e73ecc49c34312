"""llava_nb: build, train and use a LLaVA-style vision-language model on a free Colab T4.

One concern per module; each imports only modules on floors below its own (no cycles), notebooks import
only llava_nb, and nothing imports a notebook. tests/test_architecture.py checks the arrows.

    floor 8  train        train() and `python -m llava_nb.train`
    floor 7  trainer      the Trainer subclass (its private overrides, tested), callbacks, training args
             evaluate     held-out loss and accuracy, POPE, `python -m llava_nb.evaluate`; updates the card
             demo         the Gradio chat, `python -m llava_nb.demo`
    floor 6  stages       what trains in stage 1 and 2, LoRA, precision of frozen weights, unwrapping
             infer        loading an export, images, generation, streaming, the Chat
             runs         where a run's folders live (repository, Drive, tests), finding an export
             memory       the T4 memory plan on paper, and the full-size measurement beside it
             pope         POPE's questions (a seeded, balanced subset), yes/no parsing, metrics, references
    floor 5  checkpoints  trainable-state save/load, resume point, atomic commit, export, export checks
             streams      streams of samples (hub id or files), the training stream, held-out lists
             surgery      assembling LlavaForConditionalGeneration by explicit key maps
    floor 4  sources      backbones and datasets on disk: hub downloads or the offline ones written here
    floor 3  clip_pretrain  the offline CLIP twin pretrained here on drawn scenes, its zero-shot accuracy
    floor 2  data         sample checks and the assistant-only collator
             synthetic    the offline profile's drawn scenes
             env          the environment report of notebook 01
             cards        an export's model card: hub metadata, recipe, scores, how to load it
    floor 1  config       every profile number, test budgets, is_offline
             device       precision choices and memory readers
             processing   special tokens, the chat template, the processor
             fsutil       atomic folders with a manifest
             plots        loss curves and answer grids
             colab        the notebooks' first cell and the README's badges, from one repository name

Data flows one way: profile -> sources on disk -> assembled model + processor -> stream -> batches ->
trainer -> exported folder -> inference, evaluation and the demo.
"""

__version__ = "0.1.0"
