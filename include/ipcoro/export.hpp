// SPDX-License-Identifier: MIT
// IPCORO_API: what the shared library exports; everything else in it is hidden.
#pragma once

/// Marks a class or function of the public API defined in the library, and the detail
/// functions that public inline and template code calls: the library is built with hidden
/// visibility, so only these are exported. The attribute form of
/// __attribute__((visibility("default"))), so that it can stand beside [[nodiscard]].
#define IPCORO_API [[gnu::visibility("default")]]
