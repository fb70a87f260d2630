// SPDX-License-Identifier: MIT
// Compiled as C++17 by the test suite: including ipcoro must stop with one clear #error.
#include <ipcoro/ipcoro.hpp>

int main() { return 0; }
