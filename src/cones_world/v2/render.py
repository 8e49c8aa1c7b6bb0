"""Render a `Scene` to pixels with numpy alone.

Shapes, patterns, faces and hats are drawn in each thing's own unit frame (the body spans [-1, 1]), so
they scale with it. Everything is drawn at twice the output resolution and averaged down, which
anti-aliases edges and stripes alike. A scene renders the same every time: the only randomness (grass,
waves, stars, snow) comes from a seed derived from the scene itself.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from cones_world.v2.scene import Background, Face, Hat, Pattern, Scene, Thing

SUPERSAMPLE = 2


def _regular(
    n: int, radius: float = 1.0, phase: float = -math.pi / 2, inner: float | None = None
) -> np.ndarray:
    pts = []
    for i in range(n):
        a = phase + 2 * math.pi * i / n
        pts.append((radius * math.cos(a), radius * math.sin(a)))
        if inner is not None:
            b = a + math.pi / n
            pts.append((inner * math.cos(b), inner * math.sin(b)))
    return np.asarray(pts, dtype=np.float32)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return (np.stack([x, y + 2.5], axis=1) / 16.5).astype(np.float32)


def _cross(w: float = 0.36) -> np.ndarray:
    pts = [
        (-w, -1),
        (w, -1),
        (w, -w),
        (1, -w),
        (1, w),
        (w, w),
        (w, 1),
        (-w, 1),
        (-w, w),
        (-1, w),
        (-1, -w),
        (-w, -w),
    ]
    return np.asarray(pts, dtype=np.float32)


POLYGONS = {
    "triangle": np.asarray([(0.0, -1.0), (0.98, 0.78), (-0.98, 0.78)], dtype=np.float32),
    "star": _regular(5, 1.05, inner=0.45),
    "hexagon": _regular(6, 1.0, phase=0.0),
    "heart": _heart(),
    "cross": _cross(),
}


def polygon_inside(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every pixel; u, v: (H, W) local coordinates."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
        crosses = (b > v) != (d > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = a + (v - b) * (c - a) / (d - b)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of `shape` in local coordinates."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.86
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.08
    return polygon_inside(u, v, POLYGONS[shape])


def _rotated(u: np.ndarray, v: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(degrees)
    return u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)


def pattern_mask(p: Pattern, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern's tone goes, in local coordinates. A period is 2 / count (the body spans 2)."""
    if p.kind == "solid":
        return np.zeros(u.shape, dtype=bool)
    a, b = _rotated(u, v, p.angle)
    scale = p.count / 2.0
    if p.kind == "stripes":
        return (a * scale + p.phase) % 1.0 < p.width
    if p.kind == "checks":
        return (np.floor(a * scale + p.phase) + np.floor(b * scale + p.phase)).astype(int) % 2 == 1
    if p.kind == "dots":
        fa = (a * scale + p.phase) % 1.0 - 0.5
        fb = (b * scale + p.phase) % 1.0 - 0.5
        return fa * fa + fb * fb < (p.width / 2) ** 2
    if p.kind == "rings":
        return (np.sqrt(u * u + v * v) * p.count + p.phase) % 1.0 < p.width
    if p.kind == "halves":
        return a > 0
    raise ValueError(f"unknown pattern {p.kind!r}")


def face_mask(f: Face, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = f.eye_size**2
    eyes = ((u + f.eye_gap) ** 2 + (v + 0.15) ** 2 < r2) | ((u - f.eye_gap) ** 2 + (v + 0.15) ** 2 < r2)
    if f.mouth == "smile":
        r = np.sqrt(u * u + (v + 0.02) ** 2)
        mouth = (np.abs(r - 0.42) < 0.07) & (v > 0.14)
    elif f.mouth == "frown":
        r = np.sqrt(u * u + (v - 0.7) ** 2)
        mouth = (np.abs(r - 0.38) < 0.07) & (v < 0.5)
    elif f.mouth == "open":
        mouth = (u * u / 0.2**2 + (v - 0.35) ** 2 / 0.16**2) < 1.0
    else:  # flat
        mouth = (np.abs(u) < 0.3) & (np.abs(v - 0.35) < 0.06)
    return eyes | mouth


def _paint_hat(img: np.ndarray, hat: Hat, u: np.ndarray, v: np.ndarray) -> None:
    top = -0.95 - hat.height
    if hat.style == "cone":
        t = np.clip((v - top) / (hat.height + 0.05), 0, 1)  # 0 at the tip, 1 at the base
        body = (v > top) & (v < -0.9) & (np.abs(u) < 0.55 * t)
        img[body] = hat.colour
        if hat.band is not None:
            img[body & (np.abs(v - (top + 0.55 * hat.height)) < 0.1)] = hat.band
        return
    brim = (np.abs(u) < 0.78) & (v > -1.13) & (v < -0.95)
    crown = (np.abs(u) < 0.5) & (v > top) & (v <= -1.13)
    img[brim | crown] = hat.colour
    if hat.band is not None:
        img[(np.abs(u) < 0.5) & (v > -1.36) & (v <= -1.13)] = hat.band


def paint_thing(img: np.ndarray, t: Thing, size: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = t.radius * size
    u = ((xx + 0.5) - t.x * size) / r
    v = ((yy + 0.5) - t.y * size) / r
    body = shape_mask(t.shape, u, v)
    img[body] = t.colour
    img[body & pattern_mask(t.pattern, u, v)] = t.pattern.tone
    if t.face is not None:
        img[body & face_mask(t.face, u, v)] = t.face.colour
    if t.hat is not None:
        _paint_hat(img, t.hat, u, v)


def paint_background(b: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = (yy + 0.5) / size, (xx + 0.5) / size
    if b.kind == "plain":
        return np.broadcast_to(np.array(b.colour, np.float32), (size, size, 3)).copy()
    t = np.clip(yy / max(b.horizon, 1e-3), 0, 1)[..., None]
    img = np.array(b.sky_top) * (1 - t) + np.array(b.sky_bottom) * t
    if b.kind == "night":
        for x, y in zip(rng.uniform(0, 1, 40), rng.uniform(0, 1, 40), strict=True):
            img[(np.abs(xx - x) < 0.9 / size * SUPERSAMPLE) & (np.abs(yy - y) < 0.9 / size * SUPERSAMPLE)] = (
                235
            )
        if b.sun:
            disc = (xx - b.sun_x) ** 2 + (yy - b.sun_y) ** 2 < b.sun_size**2
            cut = (xx - b.sun_x - 0.5 * b.sun_size) ** 2 + (yy - b.sun_y + 0.2 * b.sun_size) ** 2 < (
                0.9 * b.sun_size
            ) ** 2
            img[disc & ~cut] = (240, 235, 170)
        return img.astype(np.float32)
    if b.sun:
        sun_y = min(b.sun_y, b.horizon - 0.02) if not b.sunset else b.horizon - 0.05
        colour = (255, 200, 60) if b.sunset else (255, 235, 90)
        img[((xx - b.sun_x) ** 2 + (yy - sun_y) ** 2 < b.sun_size**2) & (yy < b.horizon)] = colour
    phase = rng.uniform(0, 2 * np.pi)
    if b.kind == "grass":
        ground = yy >= b.horizon + 0.02 * np.sin(xx * 9 + phase)
        shade = 0.85 + 0.15 * ((np.sin(xx * 140 + phase) > 0.6) & (np.sin(yy * 60) > 0))
        img = np.where(ground[..., None], np.array([60, 160, 60]) * shade[..., None], img)
    elif b.kind == "sea":
        ground = yy >= b.horizon
        depth = np.clip((yy - b.horizon) / (1 - b.horizon), 0, 1)[..., None]
        water = np.array([40, 110, 190]) * (1 - depth) + np.array([20, 60, 140]) * depth
        waves = (np.sin(xx * 30 + np.floor(yy * 14) * 2.1 + phase) > 0.85) & (np.sin(yy * 88) > 0.4)
        water = np.where(waves[..., None], np.array([150, 200, 240]), water)
        img = np.where(ground[..., None], water, img)
    elif b.kind == "desert":
        ground = yy >= b.horizon + 0.05 * np.sin(xx * 5 + phase)
        ridge = 0.9 + 0.1 * np.sin((xx * 3 + yy * 8) * 3 + phase)
        img = np.where(ground[..., None], np.array([230, 195, 120]) * ridge[..., None], img)
    elif b.kind == "snow":
        ground = yy >= b.horizon + 0.03 * np.sin(xx * 6 + phase)
        shade = 0.94 + 0.06 * np.sin(xx * 20 + yy * 35 + phase)
        img = np.where(ground[..., None], np.array([235, 240, 248]) * shade[..., None], img)
        flakes = rng.uniform(0, 1, (60, 2))
        for x, y in flakes:
            img[(np.abs(xx - x) < 0.7 / size * SUPERSAMPLE) & (np.abs(yy - y) < 0.7 / size * SUPERSAMPLE)] = (
                250
            )
    return img.astype(np.float32)


def scene_seed(scene: Scene) -> int:
    return zlib.crc32(repr((scene.background, scene.things)).encode())


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render `scene` to a (size, size, 3) uint8 RGB array."""
    big = size * SUPERSAMPLE
    img = paint_background(scene.background, big, np.random.default_rng(scene_seed(scene)))
    for thing in scene.things:
        paint_thing(img, thing, big)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def thing_mask(thing: Thing, size: int = 64) -> np.ndarray:
    """(size, size) bool: the pixels whose centre lies inside `thing`'s body (not its hat): the subject's
    true mask, against which an attention map is measured."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = thing.radius * size
    u = ((xx + 0.5) - thing.x * size) / r
    v = ((yy + 0.5) - thing.y * size) / r
    return shape_mask(thing.shape, u, v)
