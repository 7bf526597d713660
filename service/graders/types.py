"""OpenAI's grader objects as msgspec Structs: the same ``type`` tags, field names and defaults.

These are the shapes of ``openai-python``'s ``types/graders/*`` (and the graders guide): a request
that the unmodified SDK sends decodes into them, and ``to_builtins`` gives back what OpenAI's
``graders/validate`` echoes. Decoding checks shapes only; :mod:`service.graders.validation` checks
meaning (templates, formulas, ranges, metrics that cannot run here) and names the field at fault.

Where OpenAI's own documents disagree, both spellings are accepted: the guide's examples leave out
``name`` (the SDK types require it) and carry ``pass_threshold`` (not used for a reward).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

#: OpenAI: "Your uploaded code must be less than 256kB".
MAX_SOURCE_BYTES = 256 * 1024
MAX_TEXT = 1 << 20

Name = Annotated[str, Meta(max_length=512)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]


class _Grader(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True, tag_field="type"):
    """Every grader has a ``name`` (what the response's ``metadata.name`` shows)."""

    name: Name | None = None

    @property
    def kind(self) -> str:
        return self.__struct_config__.tag  # type: ignore[return-value]

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else self.kind


class StringCheckGrader(_Grader, tag="string_check"):
    """``eq``/``ne`` compare, ``like``/``ilike`` test containment (case-sensitive / not); 1.0 or 0.0."""

    input: Text
    reference: Text
    operation: Literal["eq", "ne", "like", "ilike"]


EvaluationMetric = Literal["cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                           "rouge_4", "rouge_5", "rouge_l"]


class TextSimilarityGrader(_Grader, tag="text_similarity"):
    input: Text
    reference: Text
    evaluation_metric: EvaluationMetric
    pass_threshold: float | None = None


class PythonGrader(_Grader, tag="python"):
    """``source`` defines ``grade(sample, item) -> float``; it runs in the bubblewrap sandbox."""

    source: Annotated[str, Meta(max_length=MAX_SOURCE_BYTES)]
    #: OpenAI's runtime image tag; accepted, with no effect (alignd has one runtime, see docs).
    image_tag: Annotated[str, Meta(max_length=128)] | None = None


# --- model-grader inputs: OpenAI's message objects and content parts --------------------------------


class InputText(Struct, tag="input_text", tag_field="type", forbid_unknown_fields=True):
    text: Text


class OutputText(Struct, tag="output_text", tag_field="type", forbid_unknown_fields=True):
    text: Text


class InputImage(Struct, tag="input_image", tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    image_url: Text
    detail: str | None = None


class InputAudioData(Struct, forbid_unknown_fields=True):
    data: Text
    format: str


class InputAudio(Struct, tag="input_audio", tag_field="type", forbid_unknown_fields=True):
    input_audio: InputAudioData


ContentPart = InputText | OutputText | InputImage | InputAudio
#: A message's content: a string, one content part, or a list of parts (strings or parts).
Content = Text | ContentPart | list[Text | ContentPart]


class Message(Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    type: Literal["message"] | None = None


class SamplingParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Greedy decoding unless ``temperature`` > 0 (then ``top_p`` and ``seed`` apply)."""

    max_completions_tokens: int | None = None
    #: accepted (OpenAI's reasoning models); local models have no reasoning budget, so no effect
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class ScoreModelGrader(_Grader, tag="score_model"):
    """``model`` is an alignd base model, run by a worker; the score is clipped into ``range``."""

    input: list[Message]
    model: Name
    range: list[float] | None = None
    sampling_params: SamplingParams | None = None
    pass_threshold: float | None = None


class LabelModelGrader(_Grader, tag="label_model"):
    """The model picks one of ``labels``; the reward is 1.0 when it is one of ``passing_labels``."""

    input: list[Message]
    model: Name
    labels: list[Name]
    passing_labels: list[Name]
    sampling_params: SamplingParams | None = None


SubGrader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader


class MultiGrader(_Grader, tag="multi"):
    """``graders`` by name; ``calculate_output`` combines their rewards (OpenAI: no multi inside a multi)."""

    graders: dict[Name, SubGrader]
    calculate_output: Annotated[str, Meta(max_length=4096)]


Grader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader | MultiGrader

MODEL_GRADER_TYPES = (ScoreModelGrader, LabelModelGrader)


def walk(grader: Grader) -> list[tuple[str, SubGrader]]:
    """Every leaf grader with its param path below the grader (``""`` for the grader itself)."""
    if isinstance(grader, MultiGrader):
        return [(f"graders.{key}", sub) for key, sub in grader.graders.items()]
    return [("", grader)]


def uses_model(grader: Grader) -> bool:
    """Whether grading needs a worker's model (``score_model``/``label_model``, also inside a multi)."""
    return any(isinstance(sub, MODEL_GRADER_TYPES) for _, sub in walk(grader))


def uses_python(grader: Grader) -> bool:
    return any(isinstance(sub, PythonGrader) for _, sub in walk(grader))
