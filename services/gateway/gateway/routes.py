"""Customer-facing routes of the gateway. Contexts add theirs as they arrive."""

from fastapi import APIRouter

router = APIRouter()


@router.get("/", include_in_schema=False)
async def root() -> dict[str, str]:
    return {"service": "kabinet-gateway", "docs": "/docs", "health": "/health/ready"}
