"""llava_nb: build, train and use a LLaVA-style vision-language model on a free Colab T4.

One concern per module; each imports only modules on floors below its own (no cycles), notebooks import
only llava_nb, and nothing imports a notebook. tests/test_architecture.py checks the arrows.

    floor 5  train        train(), find_or_train() (notebooks 06/07) and `python -m llava_nb.train`
             evaluate     a test split's loss and accuracy, or POPE; `python -m llava_nb.evaluate`; the card
    floor 4  trainer      the Trainer subclass (its private overrides, tested), callbacks, training args
             scoring      held-out loss, question turns, batched greedy answers, exact match, result tables
             stages       what trains in stage 1 and 2 (from the backbones on disk), LoRA, frozen precision
             demo         the Gradio chat, `python -m llava_nb.demo`
    floor 3  sources      backbones and datasets on disk: hub downloads or the offline ones written here
             checkpoints  what training writes: trainable-state save/load, resume point, atomic commit, export
             pope         POPE's questions (a seeded, balanced subset), yes/no parsing, metrics, references
             memory       the T4 memory plan on paper, and the full-size measurement beside it
    floor 2  surgery      assembling LlavaForConditionalGeneration by explicit key maps; unwrapping it
             infer        loading an export, images, generation, streaming, the Chat
             streams      streams of samples (hub id or files), the training stream, held-out lists
             clip_pretrain  the offline CLIP twin pretrained here on drawn scenes, its zero-shot accuracy
             cards        an export's model card: hub metadata, recipe, scores, how to load it
    floor 1  runs         the run folder (repository, Drive) and its layout, what an export is, finding one
             data         sample checks and the assistant-only collator
             synthetic    the offline profile's drawn scenes
             device       precision choices (CPU bf16 autocast included) and memory readers
             env          the environment report of notebook 01
    floor 0  config       every profile number, the budgets that cap them, is_offline
             processing   special tokens, the chat template, the processor
             fsutil       atomic folders with a manifest, the checkpoint-file reader, HubUnreachable
             plots        loss curves and answer grids
             colab        `python -m llava_nb.colab`: the Colab cell and badges, from pyproject.toml

Six floors (0-5). Training writes the run folder's layout and inference reads it, both from `runs`, so
`infer` imports nothing of training. Only what a notebook or command runs lives here: the hub twins, the
local hub server and web proxy the tests serve are in tests/hub/, the speed benchmark in benchmarks/.

Data flows one way: profile -> sources on disk -> assembled model + processor -> stream -> batches ->
trainer -> exported folder -> inference, evaluation and the demo.
"""

__version__ = "0.1.0"
