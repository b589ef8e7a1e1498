"""Config section ``data``: sources, cleaning, packing, token cache and loader (owned by data_pipeline/)."""

from pydantic import Field

from indicfm.config_base import Section


class DataConfig(Section):
    inputs: list[str] = Field(default_factory=list, description="files/dirs/hub names to prepare")
    cache_dir: str | None = Field(None, description="token cache directory written by `data prepare`")
    seq_len: int = Field(512, gt=0, description="tokens per packed row")
