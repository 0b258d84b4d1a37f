"""Pydantic v2 models of the Realtime API (GA) vocabulary.

One set of models serves both directions. Every model allows extra keys, because the API grows and the relay must
pass new server fields through untouched; strictness towards *client* input is applied afterwards by
`relay.protocol.parse.unknown_fields`, which reports any key the models do not declare. Types are strict (no
"1" -> 1 coercion), as the real service is.

These models are for the edges (client data channel, upstream control events, the simulator). The audio hot path
never builds them: it looks at the raw dict's "type" first.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class RealtimeModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# --- audio and session configuration -------------------------------------------------------------------------


class AudioPCM(RealtimeModel):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] | None = None


class AudioPCMU(RealtimeModel):
    type: Literal["audio/pcmu"]


class AudioPCMA(RealtimeModel):
    type: Literal["audio/pcma"]


def _format_tag(value: Any) -> str:
    """A format that names no type is PCM (the types leave every field of each format optional)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "audio/pcm" if kind is None else kind


AudioFormat = Annotated[
    Union[Annotated[AudioPCM, Tag("audio/pcm")], Annotated[AudioPCMU, Tag("audio/pcmu")],
          Annotated[AudioPCMA, Tag("audio/pcma")]],
    Discriminator(_format_tag),
]


class NoiseReduction(RealtimeModel):
    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


Effort = Literal["minimal", "low", "medium", "high", "xhigh"]


class InputTranscription(RealtimeModel):
    model: str | None = None
    language: str | None = None
    languages: list[str] | None = None
    keywords: list[str] | None = None
    prompt: str | None = None
    delay: Effort | None = None


class ServerVad(RealtimeModel):
    type: Literal["server_vad"]
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    prefix_padding_ms: Annotated[int, Field(ge=0)] | None = None
    silence_duration_ms: Annotated[int, Field(ge=0)] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: Annotated[int, Field(ge=0)] | None = None


class SemanticVad(RealtimeModel):
    type: Literal["semantic_vad"]
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


TurnDetection = Annotated[Union[ServerVad, SemanticVad], Field(discriminator="type")]


class AudioInputConfig(RealtimeModel):
    format: AudioFormat | None = None
    noise_reduction: NoiseReduction | None = None
    transcription: InputTranscription | None = None
    turn_detection: TurnDetection | None = None


class VoiceId(RealtimeModel):
    id: str


class AudioOutputConfig(RealtimeModel):
    format: AudioFormat | None = None
    voice: str | VoiceId | None = None
    speed: Annotated[float, Field(ge=0.25, le=1.5)] | None = None


class AudioConfig(RealtimeModel):
    input: AudioInputConfig | None = None
    output: AudioOutputConfig | None = None


class FunctionTool(RealtimeModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class McpToolFilter(RealtimeModel):
    read_only: bool | None = None
    tool_names: list[str] | None = None


class McpApprovalFilter(RealtimeModel):
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


McpConnector = Literal[
    "connector_dropbox", "connector_gmail", "connector_googlecalendar", "connector_googledrive",
    "connector_microsoftteams", "connector_outlookcalendar", "connector_outlookemail", "connector_sharepoint",
]


class McpTool(RealtimeModel):
    """A remote MCP server the service calls for the model. One of server_url, connector_id, tunnel_id names it."""

    type: Literal["mcp"]
    server_label: str
    server_url: str | None = None
    connector_id: McpConnector | None = None
    tunnel_id: str | None = None
    server_description: str | None = None
    authorization: str | None = None
    headers: dict[str, str] | None = None
    allowed_tools: list[str] | McpToolFilter | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    require_approval: Literal["always", "never"] | McpApprovalFilter | None = None
    defer_loading: bool | None = None


def _tool_tag(value: Any) -> str:
    """A tool with no type is a function, as the service reads it."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "mcp" if kind == "mcp" else "function"


Tool = Annotated[
    Union[Annotated[FunctionTool, Tag("function")], Annotated[McpTool, Tag("mcp")]], Discriminator(_tool_tag)
]


class ToolChoiceFunction(RealtimeModel):
    type: Literal["function"]
    name: str


class ToolChoiceMcp(RealtimeModel):
    type: Literal["mcp"]
    server_label: str
    name: str | None = None


def _tool_choice_tag(value: Any) -> str:
    if isinstance(value, str):
        return "tool_choice_mode"
    return "mcp" if _tool_tag(value) == "mcp" else "function"


ToolChoice = Annotated[
    Union[Annotated[Literal["auto", "none", "required"], Tag("tool_choice_mode")],
          Annotated[ToolChoiceFunction, Tag("function")], Annotated[ToolChoiceMcp, Tag("mcp")]],
    Discriminator(_tool_choice_tag),
]
MaxOutputTokens = Union[Annotated[int, Field(ge=1, le=4096)], Literal["inf"]]


class Reasoning(RealtimeModel):
    effort: Effort | None = None


class TracingConfig(RealtimeModel):
    workflow_name: str | None = None
    group_id: str | None = None
    metadata: Any = None  # any JSON value


class TokenLimits(RealtimeModel):
    post_instructions: Annotated[int, Field(ge=1)] | None = None


class RetentionRatioTruncation(RealtimeModel):
    type: Literal["retention_ratio"]
    retention_ratio: Annotated[float, Field(ge=0.0, le=1.0)]
    token_limits: TokenLimits | None = None


class CacheBreakpoint(RealtimeModel):
    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class PromptText(RealtimeModel):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class PromptImage(RealtimeModel):
    type: Literal["input_image"]
    detail: Literal["low", "high", "auto", "original"]
    file_id: str | None = None
    image_url: str | None = None
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class PromptFile(RealtimeModel):
    type: Literal["input_file"]
    detail: Literal["auto", "low", "high"] | None = None
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None
    prompt_cache_breakpoint: CacheBreakpoint | None = None


PromptVariable = Union[str, Annotated[Union[PromptText, PromptImage, PromptFile], Field(discriminator="type")]]


class Prompt(RealtimeModel):
    """A stored prompt template (deprecated by OpenAI, still accepted)."""

    id: str
    version: str | None = None
    variables: dict[str, PromptVariable] | None = None


class Session(RealtimeModel):
    """The GA session object. `session.update` sends the fields it changes; the server answers with all of them.

    `id`, `object` and `expires_at` are set by the server only.
    """

    type: Literal["realtime"]
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioConfig | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: MaxOutputTokens | None = None
    tracing: Literal["auto"] | TracingConfig | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None
    prompt: Prompt | None = None
    truncation: Literal["auto", "disabled"] | RetentionRatioTruncation | None = None
    id: str | None = None
    object: Literal["realtime.session"] | None = None
    expires_at: int | None = None


# --- conversation items ----------------------------------------------------------------------------------------

ItemStatus = Literal["completed", "incomplete", "in_progress"]


class InputText(RealtimeModel):
    type: Literal["input_text"]
    text: str


class InputAudio(RealtimeModel):
    type: Literal["input_audio"]
    audio: str | None = None
    transcript: str | None = None


class InputImage(RealtimeModel):
    type: Literal["input_image"]
    image_url: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class OutputText(RealtimeModel):
    type: Literal["output_text"]
    text: str | None = None


class OutputAudio(RealtimeModel):
    type: Literal["output_audio"]
    audio: str | None = None
    transcript: str | None = None


UserContent = Annotated[Union[InputText, InputAudio, InputImage], Field(discriminator="type")]
AssistantContent = Annotated[Union[OutputText, OutputAudio], Field(discriminator="type")]


class _ItemBase(RealtimeModel):
    id: str | None = None
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None


class SystemMessage(_ItemBase):
    type: Literal["message"]
    role: Literal["system"]
    content: list[InputText]


class UserMessage(_ItemBase):
    type: Literal["message"]
    role: Literal["user"]
    content: list[UserContent]


class AssistantMessage(_ItemBase):
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[AssistantContent]


class FunctionCall(_ItemBase):
    type: Literal["function_call"]
    name: str
    arguments: str
    call_id: str | None = None


class FunctionCallOutput(_ItemBase):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class McpListedTool(RealtimeModel):
    name: str
    input_schema: Any  # a JSON schema
    description: str | None = None
    annotations: Any = None


class McpListTools(RealtimeModel):
    """The tools an MCP server offers: the service adds one to the conversation per server of the session."""

    type: Literal["mcp_list_tools"]
    server_label: str
    tools: list[McpListedTool]
    id: str | None = None


def _item_tag(value: Any) -> str | None:
    """Messages are told apart by role, the other items by type."""
    get = value.get if isinstance(value, dict) else lambda key, default=None: getattr(value, key, default)
    kind = get("type")
    return get("role") if kind == "message" else kind


ConversationItem = Annotated[
    Union[
        Annotated[SystemMessage, Tag("system")],
        Annotated[UserMessage, Tag("user")],
        Annotated[AssistantMessage, Tag("assistant")],
        Annotated[FunctionCall, Tag("function_call")],
        Annotated[FunctionCallOutput, Tag("function_call_output")],
        Annotated[McpListTools, Tag("mcp_list_tools")],
    ],
    Discriminator(_item_tag),
]


# --- responses ---------------------------------------------------------------------------------------------------


class ResponseStatusDetails(RealtimeModel):
    type: Literal["completed", "cancelled", "incomplete", "failed"] | None = None
    reason: Literal["turn_detected", "client_cancelled", "max_output_tokens", "content_filter"] | None = None
    error: dict[str, Any] | None = None


class CachedTokensDetails(RealtimeModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None
    image_tokens: int | None = None


class InputTokenDetails(RealtimeModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None
    image_tokens: int | None = None
    cached_tokens: int | None = None
    cached_tokens_details: CachedTokensDetails | None = None


class OutputTokenDetails(RealtimeModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None


class Usage(RealtimeModel):
    total_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_token_details: InputTokenDetails | None = None
    output_token_details: OutputTokenDetails | None = None


class ResponseAudioOutput(RealtimeModel):
    format: AudioFormat | None = None
    voice: str | VoiceId | None = None


class ResponseAudio(RealtimeModel):
    output: ResponseAudioOutput | None = None


class Response(RealtimeModel):
    id: str | None = None
    object: Literal["realtime.response"] | None = None
    status: Literal["completed", "cancelled", "failed", "incomplete", "in_progress"] | None = None
    status_details: ResponseStatusDetails | None = None
    output: list[ConversationItem] | None = None
    conversation_id: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    max_output_tokens: MaxOutputTokens | None = None
    audio: ResponseAudio | None = None
    usage: Usage | None = None
    metadata: dict[str, str] | None = None


class ResponseCreateParams(RealtimeModel):
    conversation: str | None = None  # "auto", "none", or a conversation id
    input: list[ConversationItem] | None = None
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    audio: ResponseAudio | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: MaxOutputTokens | None = None
    metadata: dict[str, str] | None = None
    prompt: Prompt | None = None


# --- client events (the 11 of the GA API) ----------------------------------------------------------------------


class ClientEventBase(RealtimeModel):
    event_id: str | None = None


class SessionUpdate(ClientEventBase):
    type: Literal["session.update"]
    session: Session


class InputAudioBufferAppend(ClientEventBase):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(ClientEventBase):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(ClientEventBase):
    type: Literal["input_audio_buffer.clear"]


class ConversationItemCreate(ClientEventBase):
    type: Literal["conversation.item.create"]
    item: ConversationItem
    previous_item_id: str | None = None


class ConversationItemRetrieve(ClientEventBase):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ConversationItemTruncate(ClientEventBase):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: Annotated[int, Field(ge=0)]
    audio_end_ms: Annotated[int, Field(ge=0)]


class ConversationItemDelete(ClientEventBase):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseCreate(ClientEventBase):
    type: Literal["response.create"]
    response: ResponseCreateParams | None = None


class ResponseCancel(ClientEventBase):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioBufferClear(ClientEventBase):
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Union[
    SessionUpdate,
    InputAudioBufferAppend,
    InputAudioBufferCommit,
    InputAudioBufferClear,
    ConversationItemCreate,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    ConversationItemDelete,
    ResponseCreate,
    ResponseCancel,
    OutputAudioBufferClear,
]


# --- server events -----------------------------------------------------------------------------------------------


class ServerEventBase(RealtimeModel):
    event_id: str


class ErrorDetail(RealtimeModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(ServerEventBase):
    type: Literal["error"]
    error: ErrorDetail


class SessionCreated(ServerEventBase):
    type: Literal["session.created"]
    session: Session


class SessionUpdated(ServerEventBase):
    type: Literal["session.updated"]
    session: Session


class _ItemEvent(ServerEventBase):
    item: ConversationItem
    previous_item_id: str | None = None


class ConversationItemAdded(_ItemEvent):
    type: Literal["conversation.item.added"]


class ConversationItemDone(_ItemEvent):
    type: Literal["conversation.item.done"]


class ConversationItemCreated(_ItemEvent):
    """In the types, not sent by GA servers."""

    type: Literal["conversation.item.created"]


class ConversationItemRetrieved(ServerEventBase):
    type: Literal["conversation.item.retrieved"]
    item: ConversationItem


class ConversationItemTruncated(ServerEventBase):
    type: Literal["conversation.item.truncated"]
    item_id: str
    content_index: int
    audio_end_ms: int


class ConversationItemDeleted(ServerEventBase):
    type: Literal["conversation.item.deleted"]
    item_id: str


class TranscriptionUsage(RealtimeModel):
    type: Literal["tokens", "duration"]
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    seconds: float | None = None
    input_token_details: dict[str, Any] | None = None


class InputAudioTranscriptionDelta(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.delta"]
    item_id: str
    content_index: int | None = None
    delta: str | None = None


class InputAudioTranscriptionCompleted(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.completed"]
    item_id: str
    content_index: int
    transcript: str
    usage: TranscriptionUsage


class InputAudioTranscriptionFailed(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.failed"]
    item_id: str
    content_index: int
    error: dict[str, Any]


class InputAudioTranscriptionSegment(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.segment"]
    item_id: str
    content_index: int
    id: str
    text: str
    speaker: str
    start: float
    end: float


class InputAudioBufferCommitted(ServerEventBase):
    type: Literal["input_audio_buffer.committed"]
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(ServerEventBase):
    type: Literal["input_audio_buffer.cleared"]


class InputAudioBufferSpeechStarted(ServerEventBase):
    type: Literal["input_audio_buffer.speech_started"]
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStopped(ServerEventBase):
    type: Literal["input_audio_buffer.speech_stopped"]
    audio_end_ms: int
    item_id: str


class InputAudioBufferTimeoutTriggered(ServerEventBase):
    type: Literal["input_audio_buffer.timeout_triggered"]
    audio_start_ms: int
    audio_end_ms: int
    item_id: str


class _OutputAudioBufferEvent(ServerEventBase):
    response_id: str


class OutputAudioBufferStarted(_OutputAudioBufferEvent):
    type: Literal["output_audio_buffer.started"]


class OutputAudioBufferStopped(_OutputAudioBufferEvent):
    type: Literal["output_audio_buffer.stopped"]


class OutputAudioBufferCleared(_OutputAudioBufferEvent):
    type: Literal["output_audio_buffer.cleared"]


class ResponseCreated(ServerEventBase):
    type: Literal["response.created"]
    response: Response


class ResponseDone(ServerEventBase):
    type: Literal["response.done"]
    response: Response


class _OutputItemEvent(ServerEventBase):
    response_id: str
    output_index: int
    item: ConversationItem


class ResponseOutputItemAdded(_OutputItemEvent):
    type: Literal["response.output_item.added"]


class ResponseOutputItemDone(_OutputItemEvent):
    type: Literal["response.output_item.done"]


class ContentPart(RealtimeModel):
    type: Literal["text", "audio"] | None = None
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class _ContentEvent(ServerEventBase):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class ResponseContentPartAdded(_ContentEvent):
    type: Literal["response.content_part.added"]
    part: ContentPart


class ResponseContentPartDone(_ContentEvent):
    type: Literal["response.content_part.done"]
    part: ContentPart


class ResponseOutputAudioDelta(_ContentEvent):
    type: Literal["response.output_audio.delta"]
    delta: str


class ResponseOutputAudioDone(_ContentEvent):
    type: Literal["response.output_audio.done"]


class ResponseOutputAudioTranscriptDelta(_ContentEvent):
    type: Literal["response.output_audio_transcript.delta"]
    delta: str


class ResponseOutputAudioTranscriptDone(_ContentEvent):
    type: Literal["response.output_audio_transcript.done"]
    transcript: str


class ResponseOutputTextDelta(_ContentEvent):
    type: Literal["response.output_text.delta"]
    delta: str


class ResponseOutputTextDone(_ContentEvent):
    type: Literal["response.output_text.done"]
    text: str


class ResponseFunctionCallArgumentsDelta(ServerEventBase):
    type: Literal["response.function_call_arguments.delta"]
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class ResponseFunctionCallArgumentsDone(ServerEventBase):
    type: Literal["response.function_call_arguments.done"]
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class _McpListToolsEvent(ServerEventBase):
    item_id: str


class McpListToolsInProgress(_McpListToolsEvent):
    type: Literal["mcp_list_tools.in_progress"]


class McpListToolsCompleted(_McpListToolsEvent):
    type: Literal["mcp_list_tools.completed"]


class McpListToolsFailed(_McpListToolsEvent):
    type: Literal["mcp_list_tools.failed"]


class RateLimit(RealtimeModel):
    name: Literal["requests", "tokens"] | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_seconds: float | None = None


class RateLimitsUpdated(ServerEventBase):
    type: Literal["rate_limits.updated"]
    rate_limits: list[RateLimit]


ServerEvent = Union[
    ErrorEvent,
    SessionCreated,
    SessionUpdated,
    ConversationItemAdded,
    ConversationItemDone,
    ConversationItemCreated,
    ConversationItemRetrieved,
    ConversationItemTruncated,
    ConversationItemDeleted,
    InputAudioTranscriptionDelta,
    InputAudioTranscriptionCompleted,
    InputAudioTranscriptionFailed,
    InputAudioTranscriptionSegment,
    InputAudioBufferCommitted,
    InputAudioBufferCleared,
    InputAudioBufferSpeechStarted,
    InputAudioBufferSpeechStopped,
    InputAudioBufferTimeoutTriggered,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
    OutputAudioBufferCleared,
    ResponseCreated,
    ResponseDone,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseOutputAudioDelta,
    ResponseOutputAudioDone,
    ResponseOutputAudioTranscriptDelta,
    ResponseOutputAudioTranscriptDone,
    ResponseOutputTextDelta,
    ResponseOutputTextDone,
    ResponseFunctionCallArgumentsDelta,
    ResponseFunctionCallArgumentsDone,
    McpListToolsInProgress,
    McpListToolsCompleted,
    McpListToolsFailed,
    RateLimitsUpdated,
]
