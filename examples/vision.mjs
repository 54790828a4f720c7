// Images with the npm openai package, in both forms OpenAI's documentation shows: an object with a URL
// (here a base64 data URL) and a bare URL string. tests/test_openai_vision.py runs it; the base URL, model
// and images come from the environment there.
import OpenAI from 'openai'

const openai = new OpenAI({
  baseURL: process.env.CORRAL_BASE_URL ?? 'http://localhost:11434/v1/',
  apiKey: 'ollama', // required by the client, ignored by corral
})
const model = process.env.CORRAL_MODEL ?? 'llava'
const dataUrl = process.env.CORRAL_IMAGE_DATA_URL
const httpUrl = process.env.CORRAL_IMAGE_URL ?? 'https://example.com/cat.jpg'

const ask = (image) => openai.chat.completions.create({
  model,
  temperature: 0,
  max_tokens: 4,
  messages: [{ role: 'user', content: [{ type: 'text', text: 'Describe' }, { type: 'image_url', image_url: image }] }],
})

const withObject = await ask({ url: dataUrl })
const withString = await ask(httpUrl)

console.log(JSON.stringify({
  object: withObject.choices[0].message.content,
  objectPromptTokens: withObject.usage.prompt_tokens,
  string: withString.choices[0].message.content,
  stringPromptTokens: withString.usage.prompt_tokens,
}))
