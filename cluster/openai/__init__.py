"""The OpenAI-compatible HTTP front door, one job per module: `request_models` (what clients send),
`sampling_fields` (what that asks of the engine, and which field a refusal blames), `structured_fields` (the
output's constraint: response_format, structured_outputs, guided_*, forced tool calls), `chat_template` (messages
and tools through the model's template), `tool_calls` (reading tool calls out of outputs, with `tool_parsers`),
`response_models` (what they get back), `logprobs` (per-token logprobs in OpenAI's formats), `rendering` (choices,
responses and stream events from output deltas), `errors` (error bodies and the status of each failure),
`engine_calls` (streams from the replica's engine), `beam_search` (`use_beam_search`, searched by the replica) and
`routes` (the `LLMServer` deployment: these routes on an engine replica).

Nothing is imported here: the routes need Ray Serve, which only the serve extra installs.
"""
