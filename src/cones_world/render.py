"""Render a `Scene` to pixels with numpy alone.

Shapes are signed-distance functions in each object's own unit frame (the object spans [-1, 1]), so
patterns, faces and hats scale with the object. Everything is drawn at twice the output resolution and
averaged down, which anti-aliases edges and stripes alike. A scene renders identically every time: the
only randomness (grass tufts, waves, night stars) comes from a seed derived from the scene itself.
"""

from __future__ import annotations

import zlib

import numpy as np

from cones_world.scene import BLACK, COLOURS, PLAIN_BACKGROUNDS, TONES, Background, Scene, Thing
from cones_world.v2.render import shape_mask
from cones_world.v2.render import thing_mask as thing_mask  # the same shapes, and masks, in both worlds

SUPERSAMPLE = 2


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the second tone goes, in local coordinates (patterns scale with the object)."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "hstripes":
        return np.floor(v * 2.6 + 10.0).astype(int) % 2 == 1
    if pattern == "vstripes":
        return np.floor(u * 2.6 + 10.0).astype(int) % 2 == 1
    if pattern == "dstripes":
        return np.floor((u + v) * 1.9 + 10.0).astype(int) % 2 == 1
    if pattern == "checkers":
        return (np.floor(u * 2.0 + 10.0) + np.floor(v * 2.0 + 10.0)).astype(int) % 2 == 1
    if pattern == "dots":
        fu, fv = (u * 1.7 + 10.25) % 1.0 - 0.5, (v * 1.7 + 10.25) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.2**2
    if pattern == "vsplit":
        return u > 0
    if pattern == "hsplit":
        return v > 0
    raise ValueError(f"unknown pattern {pattern!r}")


def face_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    eyes = ((u + 0.32) ** 2 + (v + 0.18) ** 2 < 0.13**2) | ((u - 0.32) ** 2 + (v + 0.18) ** 2 < 0.13**2)
    r = np.sqrt(u * u + (v + 0.05) ** 2)
    smile = (np.abs(r - 0.42) < 0.07) & (v > 0.12)
    return eyes | smile


def _sky(b: Background, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if b.sky == "sunset":
        top, bottom = np.array([120, 60, 140]), np.array([250, 150, 70])
    else:
        top, bottom = np.array([70, 140, 230]), np.array([175, 215, 245])
    t = np.clip(yy / max(b.horizon, 1e-3), 0, 1)[..., None]
    return top * (1 - t) + bottom * t


def _paint_background(b: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = (yy + 0.5) / size, (xx + 0.5) / size
    if b.kind in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.array(PLAIN_BACKGROUNDS[b.kind], np.float32), (size, size, 3)).copy()
    if b.kind == "night":
        img = np.array([10, 15, 45]) * (1 - yy[..., None]) + np.array([30, 35, 80]) * yy[..., None]
        n = 40
        sx, sy = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
        for x, y in zip(sx, sy, strict=True):
            img[(np.abs(xx - x) < 0.9 / size * SUPERSAMPLE) & (np.abs(yy - y) < 0.9 / size * SUPERSAMPLE)] = (
                235
            )
        if b.sun:
            mx, my = b.sun_x, 0.2
            disc = (xx - mx) ** 2 + (yy - my) ** 2 < 0.09**2
            cut = (xx - mx - 0.045) ** 2 + (yy - my + 0.02) ** 2 < 0.08**2
            img[disc & ~cut] = (240, 235, 170)
        return img.astype(np.float32)
    img = _sky(b, yy, xx)
    if b.sun:
        sy = b.horizon - (0.06 if b.sky == "sunset" else 0.25)
        colour = (255, 200, 60) if b.sky == "sunset" else (255, 235, 90)
        img[((xx - b.sun_x) ** 2 + (yy - sy) ** 2 < 0.085**2) & (yy < b.horizon)] = colour
    phase = rng.uniform(0, 2 * np.pi)
    if b.kind == "grass":
        horizon = b.horizon + 0.02 * np.sin(xx * 9 + phase)
        ground = yy >= horizon
        shade = 0.85 + 0.15 * ((np.sin(xx * 140 + phase) > 0.6) & (np.sin(yy * 60) > 0))
        green = np.array([60, 160, 60]) * shade[..., None]
        img = np.where(ground[..., None], green, img)
    elif b.kind == "sea":
        ground = yy >= b.horizon
        depth = np.clip((yy - b.horizon) / (1 - b.horizon), 0, 1)[..., None]
        water = np.array([40, 110, 190]) * (1 - depth) + np.array([20, 60, 140]) * depth
        waves = (np.sin(xx * 30 + np.floor(yy * 14) * 2.1 + phase) > 0.85) & (np.sin(yy * 88) > 0.4)
        water = np.where(waves[..., None], np.array([150, 200, 240]), water)
        img = np.where(ground[..., None], water, img)
    elif b.kind == "desert":
        horizon = b.horizon + 0.05 * np.sin(xx * 5 + phase)
        ground = yy >= horizon
        ridge = 0.9 + 0.1 * np.sin((xx * 3 + yy * 8) * 3 + phase)
        sand = np.array([230, 195, 120]) * ridge[..., None]
        img = np.where(ground[..., None], sand, img)
    return img.astype(np.float32)


def _paint_thing(img: np.ndarray, t: Thing, size: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = t.radius * size
    u = ((xx + 0.5) - t.x * size) / r
    v = ((yy + 0.5) - t.y * size) / r
    body = shape_mask(t.shape, u, v)
    img[body] = COLOURS[t.colour]
    second = body & pattern_mask(t.pattern, u, v)
    img[second] = TONES[t.tone]
    if t.face:
        img[body & face_mask(u, v)] = BLACK
    if t.hat is not None:
        brim = (np.abs(u) < 0.78) & (v > -1.13) & (v < -0.95)
        crown = (np.abs(u) < 0.5) & (v > -1.8) & (v <= -1.13)
        img[brim | crown] = COLOURS[t.hat.colour]
        if t.hat.band is not None:
            img[(np.abs(u) < 0.5) & (v > -1.36) & (v <= -1.13)] = TONES[t.hat.band]


def scene_seed(scene: Scene) -> int:
    return zlib.crc32(repr((scene.background, scene.things)).encode())


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render `scene` to a (size, size, 3) uint8 RGB array."""
    big = size * SUPERSAMPLE
    rng = np.random.default_rng(scene_seed(scene))
    img = _paint_background(scene.background, big, rng)
    for thing in scene.things:
        _paint_thing(img, thing, big)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
