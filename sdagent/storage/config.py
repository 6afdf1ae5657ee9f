"""The ``[outputs]`` section: where outputs go and how their links are made."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OutputsConfig(BaseModel):
    """Where outputs go and how their links are made."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field("sdagent-outputs", min_length=3, max_length=63)
    prefix: str = Field("outputs", pattern=r"^[A-Za-z0-9][A-Za-z0-9/._=-]*$")
    region: str | None = None
    endpoint_url: str | None = None  # for S3-compatible stores and tests; AWS needs none
    cloudfront_domain: str | None = None
    cloudfront_key_id: str | None = None
    cloudfront_private_key_file: Path | None = None
    url_ttl_s: int = Field(86400, ge=60, le=7 * 86400)  # SigV4 presigned URLs end at 7 days
    cache_control: str = "public, max-age=31536000, immutable"
    multipart_threshold_bytes: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)

    @model_validator(mode="after")
    def _signing_needs_both(self) -> OutputsConfig:
        if (self.cloudfront_key_id is None) != (self.cloudfront_private_key_file is None):
            raise ValueError("cloudfront_key_id and cloudfront_private_key_file go together")
        if self.cloudfront_key_id and not self.cloudfront_domain:
            raise ValueError("signed CloudFront URLs need cloudfront_domain")
        return self
