"""Request and response models of the HTTP API (pydantic; they are the OpenAPI schema too)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..model.errors import close_names

MAX_PROMPT_CHARS = 1000
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1
MAX_STEPS = 16
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength: with 4 steps, the last 3 run
MAX_LORA_SCALE = 2.0
MAX_NAMED_UNKNOWN = 5  # unknown fields named one by one in a 422
# An adapter is a sub-folder of --lora-dir: a plain folder name, never a path.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ImageFormat = Literal["png", "jpeg", "webp"]

MODEL_HELP = "which served model draws (GET /v1/models lists them); default: the first one the server was started with"
LORA_HELP = ("an exported LoRA adapter in the model's --lora-dir, by its folder name; it is added to the model's"
             " UNet for this request")
LORA_SCALE_HELP = f"with lora: how strongly the adapter acts, in [0, {MAX_LORA_SCALE:g}] (default 1; 0: the model alone)"


# ``lora`` and ``lora_scale``: the same fields on every generation endpoint.
def _lora_field() -> Any:
    return Field(None, pattern=LORA_NAME_PATTERN, description=LORA_HELP)


def _lora_scale_field() -> Any:
    return Field(None, ge=0, le=MAX_LORA_SCALE, description=LORA_SCALE_HELP)


def _seed_field(note: str = "") -> Any:
    return Field(None, ge=0, le=MAX_SEED, description=f"{note}image i uses seed + i; picked when absent")


def largest_seed(count: int) -> int:
    """The largest seed a request of ``count`` images may start at: image i uses seed + i."""
    return MAX_SEED + 1 - count


def _seeds_fit(count_field: str) -> Any:
    """A validator of ``seed`` (declared after ``count_field``): image i uses seed + i, so the last one
    must be a seed too (a returned seed past the range could not be sent back)."""
    def check(value: int | None, info: ValidationInfo) -> int | None:
        count = info.data.get(count_field, 1)
        if value is not None and value > largest_seed(count):
            raise ValueError(f"image i uses seed + i, so with {count} images the seed is at most"
                             f" {largest_seed(count)} (the last seed must be at most {MAX_SEED})")
        return value
    return field_validator("seed")(check)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain text, not only spaces")
    return value


def _null_is_default(*fields: str) -> Any:
    """A validator reading an explicit JSON null in ``fields`` as the field's default (OpenAI's API marks
    them nullable, and its client sends null for a Python None)."""
    def default(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value
    return field_validator(*fields, mode="before")(default)


def _stream_field() -> Any:
    return Field(None, description="refused when true: the images come whole, in one answer")


def _no_streaming(value: bool | None) -> bool | None:
    if value:
        raise ValueError("streaming partial images is not supported: leave stream out (or false), and the whole"
                         " images come in one answer")
    return value


# OpenAI's parameters for its own models' features (gpt-image's quality levels, moderation, reasoning, SVG and
# animated output, ...): taken and ignored, so a client written for OpenAI runs unchanged. Any other name is
# refused with the parameter it looks like (OpenAI's API refuses unknown parameters too; 'sed' for 'seed' drew
# a random seed). A multipart form sends an object as ``svg[model]``: the name before the bracket counts.
OPENAI_IGNORED = frozenset({
    "complexity", "effort", "frame_count", "frame_duration_ms", "input_fidelity", "moderation",
    "partial_images", "quality", "reasoning", "safety_identifier", "style", "svg", "user"})
# The edit form's file parts, which the route takes apart from the form's fields.
EDIT_FILES = frozenset({"image", "image[]", "mask", "markup"})


def _known_fields(route: str, ignored: frozenset[str] = frozenset(), word: str = "field",
                  files: frozenset[str] = frozenset()) -> Any:
    """A ``mode="before"`` model validator: ``ignored`` (and ``name[...]``) and the form's file parts
    ``files`` (those names exactly: a ``mask[]`` is no ``mask`` to leave out) dropped from the request, and
    more than a few unknown fields one error, not one each (600,000 keys made a 54 MB 422 and held the
    HTTP process for seconds); a few are named each in its place by ``extra="forbid"``."""
    def check(cls: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if ignored or files:
            data = {k: v for k, v in data.items()
                    if not (isinstance(k, str) and (k.split("[", 1)[0] in ignored or k in files))}
        if len(unknown := [k for k in data if k not in cls.model_fields]) > MAX_NAMED_UNKNOWN:
            shown = ", ".join(repr(str(k)[:40]) for k in unknown[:MAX_NAMED_UNKNOWN])
            raise PydanticCustomError("extra_forbidden", "{count} {word}s that {route} does not take ({shown}, ...);"
                                      " its {word}s are {fields}",
                                      {"count": f"{len(unknown):,}", "shown": shown, "route": route, "word": word,
                                       "fields": ", ".join(cls.model_fields)})
        return data
    return model_validator(mode="before")(classmethod(check))


def unknown_field_message(name: str, model: type[BaseModel], word: str = "field", also: tuple[str, ...] = ()) -> str:
    """What a request with a field ``model`` does not take is told: the one it looks like, or them all
    (``also``: the route's names outside the model, such as a form's file parts)."""
    names = [*also, *model.model_fields]
    close = close_names(name[:64], names)  # cut first: difflib on megabytes of a name held the event loop for seconds
    hint = f" (did you mean '{close[0]}'?)" if close else f"; the {word}s are {', '.join(names)}"
    return f"unknown {word} '{name[:40]}'{hint}"


def _openai_schema(example: dict[str, Any] | None = None) -> Any:
    """An OpenAI request's schema: with ``example`` (Try it out's body), and without ``extra="forbid"``'s
    ``additionalProperties: false`` (OpenAI's own parameters are taken, and the edit form's files too)."""
    def extra(schema: dict[str, Any]) -> None:
        schema.pop("additionalProperties", None)
        if example is not None:
            schema["examples"] = [example]
    return extra


BACKGROUND_HELP = "auto or opaque: these models draw opaque images (transparent is refused)"


def _background(value: str | None) -> str | None:
    if value == "transparent":
        raise ValueError("a transparent background is not supported: these models draw opaque images; leave"
                         " background out, or 'opaque' or 'auto'")
    return value


def _steps_field(note: str = "") -> Any:
    return Field(None, ge=1, le=MAX_STEPS, description=f"{note}at most the trained schedule's length")


def _compression_field() -> Any:
    return Field(None, ge=0, le=100, description="JPEG and WebP quality, 0 (smallest file) to 100 (best image);"
                 " default 75 for JPEG, 80 for WebP (Pillow's); PNG is lossless and ignores it")


class GenerateRequest(BaseModel):
    """``POST /generate``."""

    # JSON's types as they are: no "42" for 42. The example is the body /docs' "Try it out" starts from (without
    # one, Swagger UI fills every field, "model": "string" included, and the request fails).
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a lighthouse at dusk", "num_images": 1,
                                                               "seed": 42}]})

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    seed: int | None = _seed_field()
    output_format: ImageFormat = "png"
    output_compression: int | None = _compression_field()
    steps: int | None = _steps_field()
    size: str | None = Field(None, max_length=9, description="WIDTHxHEIGHT (default: the model's own size)")
    image: str | None = Field(
        None, description="image to image: a PNG, JPEG or WebP file, base64-encoded (or a data: URL), at most"
        " 16.8 megapixels; it is centre-cropped and resized to the output size, then re-noised and denoised")
    strength: float | None = Field(
        None, gt=0, le=1, description=f"with image: how far to move from it, in (0, 1] (default {DEFAULT_STRENGTH});"
        " the last round(strength * steps) steps of the schedule run; 1 starts from pure noise")
    model: str | None = Field(None, max_length=256, description=MODEL_HELP)
    lora: str | None = _lora_field()
    lora_scale: float | None = _lora_scale_field()

    _prompt = field_validator("prompt")(_non_blank)
    _seed = _seeds_fit("num_images")
    _defaults = _null_is_default("num_images", "output_format")

    _few_unknown = _known_fields("/generate")


class GeneratedImage(BaseModel):
    data: str = Field(..., description="base64-encoded image file")
    seed: int


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    model: str
    timings_ms: dict[str, float] = Field(..., description=(
        "where the time went, in ms: queue (request parsed -> its batch starts), inference (the batch's pipeline:"
        " prompt encoding, the steps, decoding), reply (the worker's answer -> the HTTP process), encode (making"
        " the image files); batch_requests and group_requests: the requests in its batch and in its forward pass"))


SIZE_PATTERN = re.compile(r"([0-9]{1,4})x([0-9]{1,4})")  # ASCII digits (\d takes "６４x６４")


class OpenAIImagesRequest(BaseModel):
    """``POST /v1/images/generations``: the OpenAI Images API request (OpenAI's parameters that do not
    apply here, :data:`OPENAI_IGNORED`, are accepted and ignored; unknown ones are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_openai_schema(
        {"prompt": "a lighthouse at dusk", "n": 1, "response_format": "b64_json"}))  # for "Try it out", as above

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=256, description=MODEL_HELP)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, max_length=9, description="WIDTHxHEIGHT (default: the model's own size)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: ImageFormat | None = None
    output_compression: int | None = _compression_field()
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description=BACKGROUND_HELP)
    seed: int | None = _seed_field("not in OpenAI's API (extra_body={'seed': ...}): ")
    steps: int | None = _steps_field("not in OpenAI's API (extra_body={'steps': ...}): ")
    lora: str | None = _lora_field()  # not in OpenAI's API: extra_body={"lora": ...}
    lora_scale: float | None = _lora_scale_field()
    stream: bool | None = _stream_field()
    image: Any = Field(None, description="refused here: image to image is POST /v1/images/edits")
    strength: Any = Field(None, description="refused here: image to image is POST /v1/images/edits")

    _prompt = field_validator("prompt")(_non_blank)
    _seed = _seeds_fit("n")
    _defaults = _null_is_default("n", "response_format")
    _stream = field_validator("stream")(_no_streaming)
    _background = field_validator("background")(_background)
    _known = _known_fields("/v1/images/generations", OPENAI_IGNORED, "parameter")

    @field_validator("image", "strength", mode="before")
    @classmethod
    def _not_here(cls, v: Any) -> Any:
        """Image to image has its own route; dropping these would answer a text-to-image picture (null: none)."""
        if v is None:
            return v
        raise ValueError("image to image is POST /v1/images/edits (client.images.edit(image=..., prompt=...),"
                         " with strength there); /v1/images/generations draws from noise")


class OpenAIEditRequest(BaseModel):
    """``POST /v1/images/edits``: the form fields of OpenAI's image edit request (the files come apart;
    :data:`OPENAI_IGNORED` are accepted and ignored, unknown fields refused)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_openai_schema())

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=256, description=MODEL_HELP)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, max_length=9, description="WIDTHxHEIGHT or auto (the model's own size); the image"
                             " is centre-cropped and resized to it")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: ImageFormat | None = None
    output_compression: int | None = _compression_field()
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description=BACKGROUND_HELP)
    strength: float | None = Field(None, gt=0, le=1, description="not in OpenAI's API: how far to move from the"
                                   f" image, in (0, 1] (default {DEFAULT_STRENGTH})")
    seed: int | None = _seed_field("not in OpenAI's API: ")
    steps: int | None = _steps_field("not in OpenAI's API: ")
    lora: str | None = _lora_field()  # not in OpenAI's API
    lora_scale: float | None = _lora_scale_field()
    stream: bool | None = _stream_field()

    _prompt = field_validator("prompt")(_non_blank)
    _seed = _seeds_fit("n")
    _stream = field_validator("stream")(_no_streaming)
    _background = field_validator("background")(_background)
    _known = _known_fields("/v1/images/edits", OPENAI_IGNORED, "parameter", EDIT_FILES)

    @field_validator("n", "seed", "steps", "output_compression", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        """A form's whole numbers as digits only (Python's int() took "1_0" as 10, pydantic "2.0" as 2)."""
        if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,20}", value.strip()):
            raise ValueError(f"{value[:30]!r} is not a whole number: write it in digits, e.g. 2")
        return value


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int = Field(..., description="this image's seed (ours beyond OpenAI's): sent again, it gives the image")


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: ImageFormat
    size: str = Field(..., description="WIDTHxHEIGHT of the images sent")


class OpenAIModel(BaseModel):
    """One entry of ``GET /v1/models``, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(..., description="when the model folder was exported (its card's time), Unix seconds")
    owned_by: str = "dmd2-fast"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The OpenAI API's error body (an unknown model: 404 with code ``model_not_found``)."""

    error: OpenAIErrorDetail
